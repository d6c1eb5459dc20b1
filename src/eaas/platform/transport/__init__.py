"""Data-plane transports (inline, shm, cuda_ipc, nixl) behind one interface.

See :mod:`eaas.platform.transport.base` for the client-side contract and
:class:`~eaas.platform.transport.select.WorkerEndpoint` for the worker side.
Importing this package imports neither CuPy nor NIXL.
"""

from eaas.platform.transport.base import ClientChannel, Slot
from eaas.platform.transport.select import (
    Incoming,
    WorkerEndpoint,
    local_capabilities,
    make_client_channel,
    select_transport,
)

__all__ = [
    "ClientChannel", "Incoming", "Slot", "WorkerEndpoint",
    "local_capabilities", "make_client_channel", "select_transport",
]
