"""Runtime of the inline recon server: the stream stages (gadgets) and the chain machinery here;
numerical cores in `numerics/`, protocol, server and replay client in `wire/`, Gadgetron
integration in `gadgetron_external/`, output formats in `formats/`.

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
