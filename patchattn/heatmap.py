"""Layers x heads heatmaps of a plan: method, expected density at a length, calibrated signals.

    plan_heatmap(plan, "heads.png", length=8192)      # or: patchattn inspect plan.json --png heads.png

Panels: the method of every (layer, q head); its expected density at `length` (from the
method's own `expected_density`; vertical_slash's is an upper bound and block_topk with gamma
is data-dependent, drawn blank); and, for calibrated plans, the per-head recall, output error
and retrieval score stored in ``plan.calibration.heads``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Union

from .methods import get_method
from .plan import Plan

_SIGNALS = [("density", "calibrated density (measured)", "viridis", (0.0, 1.0)),
            ("recall", "recall (calibration lengths)", "viridis", (0.5, 1.0)),
            ("fidelity_error", "output rel. error (verified)", "magma_r", (0.0, 0.5)),
            ("retrieval", "retrieval score", "cividis", (0.0, 1.0))]


def method_grid(plan: Plan) -> List[List[str]]:
    info = plan.model
    return [[plan.head_spec(l, h).method for h in range(info.num_q_heads)] for l in range(info.num_layers)]


def density_grid(plan: Plan, length: int) -> List[List[float]]:
    info = plan.model
    grid = []
    for l in range(info.num_layers):
        row = []
        for h in range(info.num_q_heads):
            spec = plan.head_spec(l, h)
            dense = length < plan.defaults.dense_below
            row.append(1.0 if dense else get_method(spec.method)(spec.params).expected_density(length))
        grid.append(row)
    return grid


def plan_heatmap(plan: Union[Plan, str, Path], path: Union[str, Path], length: int = 8192) -> Path:
    """Write the heatmap figure to `path` (format from the suffix; PNG recommended)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    info = plan.model
    methods = method_grid(plan)
    names = sorted({m for row in methods for m in row})  # legend: the methods in use
    code = np.array([[names.index(m) for m in row] for row in methods], dtype=float)
    density = np.array(density_grid(plan, length), dtype=float)
    heads = (plan.calibration or {}).get("heads", {}) if isinstance(plan.calibration, dict) else {}
    signals = [(k, t, c, lim) for k, t, c, lim in _SIGNALS if k in heads]

    panels = 2 + len(signals)
    height = max(3.0, 0.22 * info.num_layers + 1.5)
    width = max(2.2, 0.35 * info.num_q_heads + 1.6)
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    axes = axes[0]

    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
    cmap = ListedColormap([palette[i % len(palette)] for i in range(len(names))])
    im = axes[0].imshow(code, cmap=cmap, norm=BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names)),
                        aspect="auto", interpolation="nearest")
    cbar = fig.colorbar(im, ax=axes[0], ticks=range(len(names)))
    cbar.ax.set_yticklabels(names, fontsize=7)
    axes[0].set_title("method")

    im = axes[1].imshow(np.where(np.isnan(density), np.nan, density), cmap="viridis", vmin=0, vmax=1,
                        aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=axes[1])
    known = density[~np.isnan(density)]
    mean = f"{known.mean():.3f}" if known.size else "-"
    axes[1].set_title(f"expected density @ {length}\n(mean {mean})", fontsize=9)

    for ax, (key, title, cm, (lo, hi)) in zip(axes[2:], signals):
        values = np.array(heads[key], dtype=float)
        im = ax.imshow(values, cmap=cm, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax)
        ax.set_title(f"{title}\n(mean {np.nanmean(values):.3f})", fontsize=9)

    for ax in axes:
        ax.set_xlabel("q head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(info.num_q_heads))
        ax.tick_params(labelsize=6)
    cal = plan.calibration if isinstance(plan.calibration, dict) else {}
    recipe = cal.get("recipe", {}).get("name") if isinstance(cal.get("recipe"), dict) else None
    fig.suptitle(f"{info.architecture}: {info.num_layers} layers x {info.num_q_heads} heads"
                 + (f" -- recipe {recipe}" if recipe else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["density_grid", "method_grid", "plan_heatmap"]
