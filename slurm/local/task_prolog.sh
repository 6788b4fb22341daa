#!/bin/sh
# TaskProlog of the local test cluster: lines printed as "export NAME=VALUE" enter the
# task's environment. The emulated nodes share one real host name, so Open MPI's
# shared-memory transport (vader) names its segments identically on "different" nodes
# and ranks crash or warn about vanished segments. Unless the user picked transports
# already, keep Open MPI on self+tcp.
if [ -z "${OMPI_MCA_btl:-}" ]; then
    echo "export OMPI_MCA_btl=^vader"
fi
