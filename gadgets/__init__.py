"""Runtime of the inline recon server: protocol, stream stages (gadgets), chains, server, client.

Needs numpy, ismrmrd, onnxruntime and pyyaml only; never torch.
"""


def limit_blas_threads() -> None:
    """Run BLAS single-threaded in this process.

    The gadgets' matrix products are small and per line (coil whitening, compression); OpenBLAS
    threads only add hand-off cost there (measured: 14-coil whitening of one 384-sample line
    1046 us with default threads, 11 us with one) and compete with onnxruntime for the cores.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
