"""Forward+backward time of one adapted linear layer (a benchmark, not a test).

Rows: the frozen base linear; one LoRA of the same total rank (E*r), as configured and
eager; every selection strategy of the adapter library; HDMoLE as configured by default
(learned global prior + learned per-layer threshold) as one layer call inside an open routing
block ("hdmole layer" rows: the per-layer cost; default, eager, generic path) and with the
routing block in every step ("hdmole + block" rows: statistics, losses, NaN watch variants);
a naive implementation (Python loop over experts, router on an fp32 copy of x); and the
global accent router alone (once per model and batch, not per layer).

    python bench/adapter_layer.py --shape small                     # CPU
    python bench/adapter_layer.py --shape host                      # CPU: host cost per row
    python bench/adapter_layer.py --shape host --compile true       # ... of the compiled path
    python bench/adapter_layer.py --shape paper --out bench.json    # CUDA, bf16
    python bench/adapter_layer.py --profile                         # + ops/kernels per row
    python bench/adapter_layer.py --kernel-table "hdmole layer"     # CUDA: kernels of rows

On CUDA each row is also timed as a CUDA-graph replay (its GPU time without host costs) and
the header gives what one small eager op costs the host. Each row says which path its layer
took (MoLoRALinear.path: "fused layer" or "generic path", "(compiled)" when its arithmetic
was; AdapterConfig.compile="auto" compiles routed layers on CUDA during training, a compile
failure falls back to eager with a warning and shows here). The "generic path" rows run
HDMoLE's layer on the path every other strategy takes (inject(..., fused_layer=False)), next
to the fused layer. By default only the HDMoLE rows use compile=auto (--compile-rows all:
every routed row), which keeps the Inductor warm-up short.

The paper shape is 16,384 tokens (16 x 1024), 6400 -> 2048 (the projector's first linear
after 5-frame concatenation of a 1280-d Whisper encoder), 8 experts of rank 8.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hdmole.adapters import AdapterConfig, MoLoRALinear, fused, inject
from hdmole.adapters.selection import threshold_weights

SHAPES = {  # batch, tokens per utterance, d_in, d_out, experts, rank, encoder dim, frames
    "paper": dict(batch=16, tokens=1024, d_in=6400, d_out=2048, experts=8, rank=8,
                  feature_dim=1280, frames=5120),
    "small": dict(batch=4, tokens=128, d_in=1280, d_out=512, experts=8, rank=8,
                  feature_dim=256, frames=640),
    # Negligible arithmetic: the time is the host's (Python, dispatcher, autograd), the cost
    # that bounds the paper shape on a GPU. Compare rows by their host cost on any machine.
    "host": dict(batch=2, tokens=8, d_in=64, d_out=32, experts=8, rank=8,
                 feature_dim=16, frames=16),
}


class Wrap(nn.Module):
    """Gives inject() a parent module whose linear is named like the projector's."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear1 = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear1(x)


class NaiveMoLoRA(nn.Module):
    """What the fused layer replaces: experts in a Python loop, router on an fp32 copy."""

    def __init__(self, base: nn.Linear, experts: int, rank: int, scaling: float) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        self.A = nn.ParameterList(nn.Parameter(torch.randn(rank, base.in_features,
                                                           device=base.weight.device) * 0.01)
                                  for _ in range(experts))
        self.B = nn.ParameterList(nn.Parameter(torch.randn(base.out_features, rank,
                                                           device=base.weight.device) * 0.01)
                                  for _ in range(experts))
        self.router = nn.Linear(base.in_features, experts, bias=False, device=base.weight.device)
        self.theta = nn.Parameter(torch.zeros((), device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        p = self.router(x.float()).softmax(-1)
        w = threshold_weights(p, torch.sigmoid(self.theta) / len(self.A))
        for i, (a, b) in enumerate(zip(self.A, self.B)):
            gate = (w[..., i:i + 1] * self.scaling).to(x.dtype)
            y = y + gate * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return y


def measure(device: torch.device, step: Callable[[], None], iters: int) -> float:
    """Mean ms per call over `iters` calls (CUDA events on GPU, wall clock on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) * 1e3 / iters


def capture(step: Callable[[], None]) -> Callable[[], None]:
    """`step` (forward + backward) captured in a CUDA graph; its replay runs the same kernels
    without Python, dispatcher or launch costs: the layer's GPU time. Eager timings of small
    layers are bound by the host's ~10-30 us per op, which a real model hides behind the
    GPU work of its other layers (the host runs ahead), a lone layer cannot. A capture and
    its warm-up never compile (fused.eager): compiled rows replay their eager kernels, run
    once before the capture (their first run inside one could fail it). `step` must not keep
    autograd graphs alive between calls (their gradient nodes would stay on the stream they
    were made on)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with fused.eager():  # the warm-up runs the (eager) kernels the capture records
        with torch.cuda.stream(side):  # on a side stream, as CUDA graph capture requires
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            step()
    return graph.replay


def count_ops(step: Callable[[], None], cuda: bool) -> dict[str, int]:
    """Top-level aten ops (a proxy for kernel launches and dispatcher overhead) and, on CUDA,
    kernels of one call of `step` (fwd+bwd), counted by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"aten_ops": len(aten), "cuda_kernels": len(kernels)}


def kernel_table(step: Callable[[], None], rows: int = 30) -> str:
    """The CUDA kernels of one call of `step`, by GPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows)


def host_op_us(device: torch.device, ops: int = 2000) -> float:
    """Microseconds one small eager op (an in-place multiply of a (16384, 8) fp32 tensor,
    no autograd) costs the host: the unit of the launch-bound rows."""
    t = torch.ones(16384, 8, device=device)
    for _ in range(50):
        t.mul_(1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(ops):
        t.mul_(1.0)
    elapsed = time.perf_counter() - t0  # queued, not waited for: the host's time
    if device.type == "cuda":
        torch.cuda.synchronize()
    return elapsed * 1e6 / ops


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="default: paper on CUDA, small on CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", choices=("bf16", "fp32", "auto"), default="auto",
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 on CUDA, 50 on CPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1 keeps CPU timings stable on a shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    parser.add_argument("--compile-rows", choices=("hdmole", "all", "none"), default="hdmole",
                        help="rows whose routing uses compile=auto (compiled on CUDA); the "
                             "others run eager. Default hdmole: one compiled graph family, so "
                             "the Inductor warm-up stays short")
    parser.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                        help="AdapterConfig.compile of the rows that compile (--compile-rows): "
                             "auto compiles routed layers on CUDA in training; true also on "
                             "CPU (Inductor's C++ backend), e.g. the compiled path's host "
                             "cost with --shape host on a machine without a GPU")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="CUDA: skip the CUDA-graph replay columns (GPU time without host "
                             "launch costs)")
    parser.add_argument("--kernel-table", action="append", default=[], metavar="TEXT",
                        help="CUDA: print the kernels (GPU time, calls) of one fwd+bwd of each "
                             "row whose name contains TEXT (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="count top-level aten ops (CPU) and CUDA kernels of one fwd+bwd per row")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    shape_name = args.shape or ("paper" if cuda else "small")
    shape = SHAPES[shape_name]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if cuda else torch.float32)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    # CPU: many single-call samples and their minimum, robust to other jobs on shared cores.
    iters = args.iters if args.iters is not None else (20 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (5 if cuda else 50)
    if not cuda:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    b, t, d_in, d_out = shape["batch"], shape["tokens"], shape["d_in"], shape["d_out"]
    experts, rank = shape["experts"], shape["rank"]
    x = torch.randn(b, t, d_in, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(b, t, d_out, device=device, dtype=dtype)
    token_mask = torch.ones(b, t, dtype=torch.bool, device=device)
    token_mask[-1, t // 2:] = False  # some padding, as in a real batch
    labels = torch.arange(b, device=device) % experts
    pooled_features = torch.randn(b, 1, shape["feature_dim"], device=device, dtype=dtype)
    frames = torch.randn(b, shape["frames"], shape["feature_dim"], device=device, dtype=dtype)
    frame_mask = torch.ones(b, shape["frames"], dtype=torch.bool, device=device)
    base_cfg = AdapterConfig(num_experts=experts, rank=rank, alpha=2.0 * rank,
                             compile=args.compile)

    def fresh_base() -> nn.Linear:
        torch.manual_seed(0)
        return nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)

    row_layers: dict[Callable[[], None], MoLoRALinear] = {}  # a row's adapted layer

    def layer_step(module: nn.Module, context: Callable[[], object] | None) -> Callable[[], None]:
        params = [p for p in module.parameters() if p.requires_grad]
        # Each row its own input leaf: a graph another row keeps alive (its routing state's
        # loss terms) would otherwise keep x's gradient node on the default stream, which a
        # CUDA-graph capture cannot synchronise with.
        row_x = x.detach().clone().requires_grad_()

        def step() -> None:
            row_x.grad = None
            for p in params:
                p.grad = None
            if context is None:
                y = module(row_x)
            else:
                with context():
                    y = module(row_x)
            y.backward(grad_out)
        if isinstance(getattr(module, "linear1", None), MoLoRALinear):
            row_layers[step] = module.linear1
        return step

    def adapted(cfg: AdapterConfig, fused_layer: bool = True):
        module = Wrap(fresh_base())
        handle = inject(module, cfg, num_accents=experts, accent_feature_dim=shape["feature_dim"],
                        fused_layer=fused_layer)
        handle.to(device)
        with torch.no_grad():  # non-zero B: the same work as after the first update
            for layer in handle.layers.values():
                layer.lora_B.normal_(0, 0.02)
        return module, handle

    rows: list[tuple[str, Callable[[], None]]] = [("frozen base linear", layer_step(Wrap(fresh_base()), None))]
    other_compile = args.compile if args.compile_rows == "all" else "false"
    if args.compile_rows == "none":
        base_cfg = replace(base_cfg, compile="false")
    for name, compile_mode in (("", base_cfg.compile), (" (eager)", "false")):
        lora_module, _ = adapted(replace(base_cfg, method="lora", compile=compile_mode))
        rows.append((f"lora rank {experts * rank}{name}", layer_step(lora_module, None)))
    local = replace(base_cfg, global_router="none", combine="local", lambda_accent=0.0,
                    compile=other_compile)
    for selection in ("dense", "topk", "topp", "fixed_threshold", "threshold", "token_threshold"):
        module, handle = adapted(replace(local, selection=selection))
        rows.append((f"mole {selection} (fused)",
                     layer_step(module, lambda h=handle: h.routing(token_mask=token_mask))))
    open_blocks = []
    # Training runs without routing statistics (the trainer turns them on for validation).
    # "layer" rows: the cost of one adapted layer, inside a routing block opened once (a
    # model opens one per batch for all its layers: its cost is the global router row).
    # Their log g is a leaf, so each step still computes the layer's gradient w.r.t. it.
    # The other hdmole rows open the block (global router forward) in every step.
    for name, cfg, stats, fused_layer, per_layer in (
            ("hdmole layer (default)", base_cfg, False, True, True),
            ("hdmole layer (fused, eager)", replace(base_cfg, compile="false"), False, True, True),
            ("hdmole layer (generic path)", base_cfg, False, False, True),
            ("hdmole + block (default)", base_cfg, False, True, False),
            ("hdmole + block (generic path)", base_cfg, False, False, False),
            ("hdmole + block, no finite check", replace(base_cfg, check_finite=False), False,
             True, False),
            ("hdmole + block + statistics", base_cfg, True, True, False),
            ("hdmole + block, balance+z loss", replace(
                base_cfg, lambda_balance=0.01, lambda_z=0.001), False, True, False)):
        module, handle = adapted(cfg, fused_layer)
        handle.statistics_enabled = stats
        if per_layer:
            block = handle.routing(pooled_features, None, labels, token_mask)
            block.__enter__()
            open_blocks.append(block)  # referenced: a collected block would close itself
            with torch.no_grad():
                module(x)  # makes the block's per-token-shape view ...
            state = handle.state  # ... whose log g becomes a leaf (graphs must not persist)
            state.views = {key: view._replace(log_g=view.log_g.detach().requires_grad_())
                           for key, view in state.views.items()}
            rows.append((name, layer_step(module, None)))
        else:
            rows.append((name, layer_step(module, lambda h=handle: h.routing(
                pooled_features, None, labels, token_mask))))
    module, handle = adapted(replace(base_cfg, global_router="oracle", combine="global",
                                     selection="dense", compile=other_compile))
    rows.append(("oracle_accent (fused)", layer_step(module, lambda h=handle: h.routing(
        accent_labels=labels, token_mask=token_mask))))
    naive = NaiveMoLoRA(fresh_base(), experts, rank, 2.0)
    rows.append(("naive loop over experts", layer_step(naive, None)))
    _, router_handle = adapted(base_cfg)

    def global_router_step() -> None:
        for p in router_handle.global_router.parameters():
            p.grad = None
        with router_handle.routing(frames, frame_mask, labels):
            pass
        router_handle.auxiliary_losses()["accent_ce"].backward()
    rows.append(("global router alone (per model)", global_router_step))

    # Rows take turns (round robin) so that load changes on a shared machine hit all alike;
    # a row's time is the median of its repeats on CUDA and the minimum on a (noisy) CPU.
    samples: dict[str, list[float]] = {name: [] for name, _ in rows}
    peaks: dict[str, float | None] = {}
    paths: dict[str, str] = {}
    for name, step in rows:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step()
        paths[name] = row_layers[step].path(x) if step in row_layers else "-"
        if cuda:
            torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    counts = {name: count_ops(step, cuda) for name, step in rows} if args.profile else {}
    kernel_tables = {name: kernel_table(step) for name, step in rows
                     if cuda and any(text in name for text in args.kernel_table)}
    for _ in range(repeats):
        for name, step in rows:
            samples[name].append(measure(device, step, iters))
    # GPU time: every row captured once (eager routing: capture never compiles), replays
    # timed round robin like the eager rows. A row that cannot be captured says why.
    replays: dict[str, Callable[[], None]] = {}
    graph_errors: dict[str, str] = {}
    if cuda and args.graphs:
        for name, step in rows:
            try:
                replays[name] = capture(step)
            except Exception as err:  # noqa: BLE001 - reported in the row, the others go on
                graph_errors[name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                torch.cuda.synchronize()
    graph_samples: dict[str, list[float]] = {name: [] for name in replays}
    for _ in range(repeats):
        for name, replay in replays.items():
            graph_samples[name].append(measure(device, replay, iters))
    pick = statistics.median if cuda else min
    results = [{"name": name, "ms": pick(samples[name]), "peak_mib": peaks[name],
                "path": paths[name], "samples_ms": samples[name],
                "graph_ms": pick(graph_samples[name]) if name in graph_samples else None,
                "graph_error": graph_errors.get(name), **counts.get(name, {})} for name, _ in rows]
    base_ms, base_graph_ms = results[0]["ms"], results[0]["graph_ms"]
    for row in results:
        row["ratio_to_base"] = row["ms"] / base_ms
        row["graph_ratio_to_base"] = (row["graph_ms"] / base_graph_ms
                                      if row["graph_ms"] is not None and base_graph_ms else None)

    op_us = host_op_us(device)
    device_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(f"# {device_name}, torch {torch.__version__}, {str(dtype).replace('torch.', '')}, "
          f"threads {torch.get_num_threads()}, shape {shape_name}: {b * t} tokens, "
          f"{d_in} -> {d_out}, {experts} experts rank {rank}; fwd+bwd, "
          f"{'median' if cuda else 'min'} of {repeats} x {iters} iters; one small "
          f"op costs the host {op_us:.1f} us")
    graphs = bool(replays)
    print(f"{'layer':<34}{'ms':>10}{'x base':>9}" + (f"{'peak MiB':>11}" if cuda else "")
          + (f"{'graph ms':>10}{'x base':>9}" if graphs else "")
          + (f"{'aten ops':>10}{'kernels':>9}" if args.profile else "") + "  path")
    for row in results:
        line = f"{row['name']:<34}{row['ms']:>10.3f}{row['ratio_to_base']:>9.2f}"
        if cuda:
            line += f"{row['peak_mib']:>11.0f}"
        if graphs:
            line += (f"{row['graph_ms']:>10.3f}" if row["graph_ms"] is not None else f"{'-':>10}")
            line += (f"{row['graph_ratio_to_base']:>9.2f}"
                     if row["graph_ratio_to_base"] is not None else f"{'-':>9}")
        if args.profile:
            line += f"{row['aten_ops']:>10}{row['cuda_kernels'] if cuda else '-':>9}"
        print(line + "  " + row["path"])
    for name, error in graph_errors.items():
        print(f"# {name}: not captured in a CUDA graph ({error})")
    if fused.compile_error() is not None:
        print(f"# torch.compile failed, later rows ran eager: {fused.compile_error()}")
    for name, table in kernel_tables.items():
        print(f"# CUDA kernels of one fwd+bwd of {name!r}\n{table}")
    report = {"device": device_name, "torch": torch.__version__, "dtype": str(dtype),
              "host_op_us": op_us,
              "shape": {"name": shape_name, **shape}, "threads": torch.get_num_threads(),
              "warmup": warmup, "iters": iters, "repeats": repeats,
              "command": " ".join([sys.executable, *sys.argv]), "rows": results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    assert all(math.isfinite(r["ms"]) for r in results)
    return report


if __name__ == "__main__":
    main()
