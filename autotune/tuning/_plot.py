"""``autotune tune --plot``: samples/s of every trial, the chosen one marked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import LoaderConfig
from ..errors import AutotuneError
from ..policy.search import setting_key

if TYPE_CHECKING:
    from .result import TuningResult


def plot_trials(result: TuningResult, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AutotuneError("--plot needs matplotlib: pip install 'autotune[plot]'") from None
    chosen = setting_key(result.best)
    labels, rates, colors = [], [], []
    for i, trial in enumerate(result.trials, 1):
        c = trial.config
        assert isinstance(c, LoaderConfig)  # one loader's trials
        labels.append(f"{i}: {c.num_workers}w p{c.prefetch_factor or '-'}"
                      f"{'' if c.worker_threads is None else f' t{c.worker_threads}'}")
        rates.append(trial.samples_per_s or 0)
        colors.append("tab:red" if not trial.ok else "tab:green"
                      if setting_key(c) == chosen else "tab:blue")
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rates)), 4))
    ax.bar(range(len(rates)), rates, color=colors)
    ax.set_xticks(range(len(rates)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("samples/s")
    if result.baseline_samples_per_s:
        ax.axhline(result.baseline_samples_per_s, color="gray", linestyle="--",
                   label="torch's defaults")
        ax.legend()
    ax.set_title(f"autotune tune: {result.key}, batch {result.batch_size}")
    ax.set_xlabel("trial: workers, prefetch, threads (green: chosen, red: failed)")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:  # a bad path or an unknown file extension
        raise AutotuneError(f"--plot {path}: cannot write the plot ({exc}); the profile "
                            "was saved") from None
    finally:
        plt.close(fig)
