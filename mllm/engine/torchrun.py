"""``python -m mllm.engine.torchrun TORCHRUN_ARGS...``: torchrun whose rendezvous store
listens on ``--master_addr`` only (``mllm train`` launches multi-process runs with it).

torch's TCPStore server, which torchrun's static rendezvous starts on node 0, binds the
wildcard address (``::``, every interface) whatever ``--master_addr`` says, so with
``ADDR=127.0.0.1`` an unauthenticated key-value store is still reachable from the network
(checked with torch 2.14, libuv and legacy backends alike). torch has no flag or
environment variable for the listening address, but TCPStore takes an already bound socket
(``master_listen_fd``), and a ``multi_tenant`` store reuses the server already running on
its port in the same process (documented TCPStore behaviour; the static rendezvous opens its
store with ``multi_tenant=True``). So on node 0 this module starts that server on a socket
bound to ADDR:PORT, then runs torchrun in the same process.
"""
import datetime
import os
import socket
import sys
from typing import List, Optional


def bound_store(addr: str, port: int):
    """A TCPStore server listening on ``addr:port`` only (kept alive by the caller)."""
    from torch.distributed import TCPStore

    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
    try:
        listener = socket.create_server((addr, port), family=family)
    except OSError as err:
        raise OSError(f'cannot listen on {addr}:{port} for the torchrun rendezvous ({err}); '
                      'set PORT to a free port') from err
    # the store's server takes over the file descriptor (it does not duplicate it)
    return TCPStore(addr, port, None, True, datetime.timedelta(seconds=60),
                    wait_for_workers=False, multi_tenant=True, master_listen_fd=listener.detach())


def main(argv: Optional[List[str]] = None) -> None:
    from torch.distributed.run import main as torchrun, parse_args

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    store = None
    if args.rdzv_backend == 'static' and args.node_rank == 0 and args.master_port:
        store = bound_store(args.master_addr, args.master_port)  # noqa: F841 (kept alive)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        torchrun(argv)
    except ChildFailedError as err:
        if os.environ.get('MLLM_DEBUG', '') not in ('', '0'):
            raise
        # each process printed its own one-line error; torch's 40-line report adds nothing
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed: name the signal, as torch's report does (e.g. SIGKILL)
            import signal
            try:
                code = f'{code}, {signal.Signals(-code).name}'
            except ValueError:
                pass
        print(f'mllm train: error: the process of rank {rank} failed first (exit '
              f'{code}; the errors are above, MLLM_DEBUG=1 shows torchrun\'s report)',
              file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
