"""Interoperability with Hugging Face ``transformers``: ``moe-dist export`` (``export.py``).

Importing and upcycling (``model.init_from``) belongs to training and lives lower down
(``train/init_from.py``, ``models/hf_format.py``, ``models/upcycle.py``). docs/interop.md
describes both directions.
"""
