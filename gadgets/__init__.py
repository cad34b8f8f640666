"""Runtime of the inline recon server: protocol, stream stages (gadgets), chains, server, client.

Needs numpy, ismrmrd, onnxruntime and pyyaml only; never torch.
"""
