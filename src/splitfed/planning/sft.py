"""``sft`` planner (SFT: split fine-tuning in wireless networks): two timescales.

Slow timescale, once per run: each device's cut (blocks on the device) and two compression
rates, one for its activations and one for the gradients sent back to it (each a rung of
``LADDER``, priced with the codecs' ``bytes_per_element``), under device memory and two accuracy
limits: the mean over devices of the activation pipelines' error <= ``PlanOptions.max_error``, and
of the gradient pipelines' error <= ``PlanOptions.max_grad_error``. The errors are measured on the
configured model's real tensors at each cut (``planning.calibrate``; ``CodecError.worst``, the larger
of the whole-tensor and the median per-token relative error).
Per step the delay is max_u head_u + sum_u server_u + max_u tail_u (the shared server takes
the devices' batches together), written with epigraph variables t_h >= head_u, t_t >= tail_u
and solved by an augmented Lagrangian: per device the option (cut, activation rung, gradient
rung) minimising its server time plus the augmented penalties (the error constraints' terms
linearised), then t_h, t_t in closed form, then multiplier ascent. The slow problem sees each
device's mean rate over the rounds.

Fast timescale, per channel realisation (round): subchannels by SLSQP
(``planning.spectrum.slsqp_owners``). Two passes: rates -> slow -> fast -> rates -> slow -> fast.

With a protocol whose devices share one cut (sfl) both a common cut and per-device cuts (with
the protocol its class names in ``per_device_cuts``, memsfl) are solved and the faster is kept;
the configured (equal) decision is the first incumbent, so sft never predicts a slower round
than ``equal``.
"""

from __future__ import annotations

import numpy as np

from splitfed.planning.problem import BITS, Decision, PlanOptions, Problem
from splitfed.planning.spectrum import slsqp_owners
from splitfed.registry import protocol_class
from splitfed.system.traffic import step_bytes

LADDER = (
    "none", "fp16", "quant:8 > zstd", "quant:6 > zstd", "quant:4 > zstd",
    "topk:0.5 > quant:8 > zstd", "topk:0.3 > quant:6 > zstd", "topk:0.2 > quant:4 > zstd", "topk:0.1 > quant:4 > zstd",
)


def _mean_rates(problem: Problem, decision: Decision) -> tuple[np.ndarray, np.ndarray]:
    """Each device's (up, down) bit/s averaged over the rounds' channel realisations."""
    rates = [problem.rates(r, problem.equal_owners() if decision.owners is None else decision.owners[r], decision.power)
             for r in range(problem.rounds)]
    return np.mean([up for up, _ in rates], axis=0), np.mean([down for _, down in rates], axis=0)


def _error_grid(problem: Problem, stream: str, ladder: tuple[str, ...], cuts: list[int]) -> np.ndarray:
    """(cuts, rungs) measured error (``CodecError.worst``) of each rung on ``stream`` at each cut."""
    specs = [spec for _ in cuts for spec in ladder]
    at = [cut for cut in cuts for _ in ladder]
    errors = problem.codec_errors(stream, specs, at)
    return np.array([e.worst for e in errors]).reshape(len(cuts), len(ladder))


def _options(problem: Problem, protocol: str, cuts: list[int], ladder: tuple[str, ...],
             up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, ...]:
    """Seconds per step of each device's options (cut, activation rung, gradient rung): head
    (devices, cuts, rungs, 1), tail (devices, cuts, 1, rungs), server (devices, cuts, 1, 1); and the
    measured errors of the activation rungs (cuts, rungs, 1) and of the gradient rungs (cuts, 1, rungs)."""
    ranks = problem.ranks
    n, steps = problem.n, problem.steps
    plain = ["none"] * n
    per_cut = [problem.loads(protocol, np.full(n, c), ranks, plain, plain) for c in cuts]

    def per_device_and_cut(field: str) -> np.ndarray:  # (devices, cuts, 1, 1)
        return np.stack([getattr(lo, field) for lo in per_cut], axis=1)[:, :, None, None]

    fwd, bwd, server = per_device_and_cut("forward_s"), per_device_and_cut("backward_s"), per_device_and_cut("server_s")
    download, upload = per_device_and_cut("download"), per_device_and_cut("upload")
    sizes = [step_bytes(problem.costs, 0, problem.batch, problem.seq, s, s) for s in ladder]
    act = np.array([s["activations"] for s in sizes])[None, None, :, None]
    grad = np.array([s["activation_grad"] for s in sizes])[None, None, None, :]
    control = per_cut[0]
    up4, down4 = up[:, None, None, None], down[:, None, None, None]
    head = fwd + BITS * act / up4 + BITS * download / down4 / steps
    tail = (BITS * grad / down4 + bwd + BITS * control.norm[:, None, None, None] / up4
            + BITS * control.clip[:, None, None, None] / down4 + BITS * upload / up4 / steps)
    fits = np.array([[problem.memory(c, int(ranks[u])) <= problem.budget[u] for c in cuts] for u in range(n)])
    head = np.where(fits[:, :, None, None], head, np.inf)
    act_error = _error_grid(problem, "activations", ladder, cuts)[:, :, None]
    grad_error = _error_grid(problem, "gradients", ladder, cuts)[:, None, :]
    return head, tail, server, act_error, grad_error


def _augmented_lagrangian(head: np.ndarray, tail: np.ndarray, server: np.ndarray,
                          limits: list[tuple[np.ndarray, float]], iterations: int = 25) -> tuple[np.ndarray, float]:
    """Option index (devices,) into the flattened grid of options (head, tail and server broadcast
    to (devices, *grid)) minimising the step time max head + sum server + max tail subject to, for
    each (error over the grid, limit) of ``limits``, mean over devices of the error <= limit; and that time."""
    grid = np.broadcast_shapes(head.shape, tail.shape, server.shape)
    n = grid[0]
    h, t, s = (np.broadcast_to(a, grid).reshape(n, -1) for a in (head, tail, server))
    errors = [np.broadcast_to(error, grid[1:]).reshape(-1) for error, _ in limits]
    bounds = np.array([limit for _, limit in limits])

    def value(choice: np.ndarray) -> float:
        rows = np.arange(n)
        return float(h[rows, choice].max() + s[rows, choice].sum() + t[rows, choice].max())

    # Incumbent: the fastest option of each device among the exact (error 0) ones.
    exact = np.where(np.all([e <= 0.0 for e in errors], axis=0)[None, :], h + s + t, np.inf)
    best = np.argmin(exact, axis=1)
    best_value = value(best)
    scale = max(best_value, 1e-12)
    h, t, s = h / scale, t / scale, s / scale
    lam, mu, nu, rho = np.zeros(n), np.zeros(n), np.zeros(len(limits)), 1.0
    rows = np.arange(n)
    t_h, t_t = h[rows, best].max(), t[rows, best].max()
    mean_errors = np.zeros(len(limits))

    def penalty(g: np.ndarray, mult: np.ndarray) -> np.ndarray:
        return (np.maximum(0.0, mult[:, None] + rho * g) ** 2 - mult[:, None] ** 2) / (2 * rho)

    def epigraph(values: np.ndarray, mult: np.ndarray) -> float:
        """argmin_t t + sum_u penalty(values_u - t): the t with sum_u rho max(0, a_u - t) = 1,
        a_u = values_u + mult_u / rho (piecewise linear in t: solved over the sorted a)."""
        a = np.sort(values + mult / rho)[::-1]
        k = np.arange(1, len(a) + 1)
        candidates = (np.cumsum(a) - 1.0 / rho) / k
        below = np.append(a[1:], -np.inf)
        valid = (candidates >= below) & (candidates <= a)
        return float(candidates[np.argmax(valid)]) if valid.any() else float(a[0] - 1.0 / rho)

    for _ in range(iterations):
        error_weights = np.maximum(0.0, nu + rho * (mean_errors - bounds)) / n
        cost = s + penalty(h - t_h, lam) + penalty(t - t_t, mu)
        cost = cost + sum(w * e for w, e in zip(error_weights, errors))[None, :]
        cost = np.where(np.isfinite(h), cost, np.inf)
        choice = np.argmin(cost, axis=1)
        heads, tails = h[rows, choice], t[rows, choice]
        t_h, t_t = epigraph(heads, lam), epigraph(tails, mu)
        mean_errors = np.array([e[choice].mean() for e in errors])
        lam = np.maximum(0.0, lam + rho * (heads - t_h))
        mu = np.maximum(0.0, mu + rho * (tails - t_t))
        nu = np.maximum(0.0, nu + rho * (mean_errors - bounds))
        rho = min(rho * 1.5, 1e4)
        if np.all(mean_errors <= bounds + 1e-12) and value(choice) * scale < best_value:
            best, best_value = choice.copy(), value(choice) * scale
    return best, best_value


def slow_timescale(problem: Problem, protocol: str, ladder: tuple[str, ...], max_error: float,
                   max_grad_error: float, up: np.ndarray, down: np.ndarray, common_cut: bool) -> Decision:
    """Cuts and codecs: per device, or one cut for all (each common cut solved, best kept)."""
    limit = problem.total_layers - 1
    best: tuple[float, Decision] | None = None
    groups = [[c] for c in range(1, limit + 1)] if common_cut else [list(range(1, limit + 1))]
    for cuts in groups:
        head, tail, server, act_error, grad_error = _options(problem, protocol, cuts, ladder, up, down)
        if not np.all(np.isfinite(head).any(axis=(1, 2, 3))):
            continue  # some device cannot hold this cut
        limits = [(act_error, max_error), (grad_error, max_grad_error)]
        choice, step = _augmented_lagrangian(head, tail, server, limits)
        cut_index, act_rung, grad_rung = np.unravel_index(choice, (len(cuts), len(ladder), len(ladder)))
        decision = Decision(protocol, np.array([cuts[i] for i in cut_index]), problem.ranks.copy(),
                            [ladder[k] for k in act_rung], [ladder[k] for k in grad_rung])
        if best is None or step < best[0]:
            best = (step, decision)
    assert best is not None  # cut 1 fits every device (Problem checked it)
    return best[1]


def fast_timescale(problem: Problem, decision: Decision, polish: bool = True) -> Decision:
    """Subchannels for every round's channel realisation (SLSQP when ``polish``)."""
    loads = problem.loads(decision.protocol, decision.cuts, decision.ranks, decision.activations, decision.gradients)
    decision.owners = [slsqp_owners(problem, decision.protocol, loads, r, polish) for r in range(problem.rounds)]
    return decision


def solve(problem: Problem, ladder: tuple[str, ...], max_error: float, max_grad_error: float,
          allocate: bool) -> Decision:
    """Best of the equal decision and the two-timescale solutions for each allowed cut structure."""
    incumbent = problem.equal_decision()
    config_protocol = problem.config.protocol
    configured = protocol_class(config_protocol)
    per_device = configured.per_device_cuts if configured.common_cut else None
    structures = [(config_protocol, configured.common_cut)]  # (protocol, one common cut)
    if per_device:
        structures.append((per_device, False))
    best, best_delay = incumbent, problem.mean_delay(incumbent)
    for protocol, common in structures:
        decision = Decision(protocol, incumbent.cuts, incumbent.ranks, incumbent.activations, incumbent.gradients)
        passes = 2 if allocate else 1
        for index in range(passes):
            up, down = _mean_rates(problem, decision)
            decision = slow_timescale(problem, protocol, ladder, max_error, max_grad_error, up, down, common)
            if allocate:
                decision = fast_timescale(problem, decision, polish=index == passes - 1)
        if protocol == per_device and len(set(decision.cuts.tolist())) == 1:
            decision.protocol = config_protocol  # one cut after all: keep the configured protocol's server side
        delay = problem.mean_delay(decision)
        if delay < best_delay:
            best, best_delay = decision, delay
    return best


def sft(problem: Problem, options: PlanOptions) -> Decision:
    """Per-device cut and codecs (slow) and per-round subchannels (fast), under ``options.max_error``
    (activations) and ``options.max_grad_error`` (gradients)."""
    return solve(problem, LADDER, options.max_error, options.max_grad_error, allocate=True)
