"""Helpers shared by the test modules."""

import torch


def randomize_bn(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-default BatchNorm statistics and affines, so equivalence checks mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def run_unprivileged(cmd: list[str], cwd, **kwargs):
    """Run `cmd` without the power to ignore file permissions. Tests often run as root, and root
    writes into read-only folders; the child drops CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and
    CAP_FOWNER from its capability bounding set first, so a permission check behaves as it would
    for a real user (a no-op for a non-root user, who has none of them)."""
    import ctypes
    import os
    import subprocess

    def drop() -> None:
        if os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
                if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, preexec_fn=drop, timeout=300, **kwargs)
