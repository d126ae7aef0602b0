"""``sft`` planner (SFT: split fine-tuning in wireless networks): two timescales.

Slow timescale, once per run: each device's cut (blocks on the device) and compression rate
(a rung of ``LADDER``, priced with the codecs' ``bytes_per_element`` and
``expected_relative_error``), under device memory and a limit on the mean compression error.
Per step the delay is max_u head_u + sum_u server_u + max_u tail_u (the shared server takes
the devices' batches together), written with epigraph variables t_h >= head_u, t_t >= tail_u
and solved by an augmented Lagrangian: per device the option minimising its server time plus
the augmented penalties (the error constraint's term linearised), then t_h, t_t by bisection,
then multiplier ascent. The slow problem sees each device's mean rate over the rounds.

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
from splitfed.wire.codecs import expected_relative_error

LADDER = (
    "none", "fp16", "quant:8 > zstd", "quant:6 > zstd", "quant:4 > zstd",
    "topk:0.5 > quant:8 > zstd", "topk:0.3 > quant:6 > zstd", "topk:0.2 > quant:4 > zstd", "topk:0.1 > quant:4 > zstd",
)


def _mean_rates(problem: Problem, decision: Decision) -> tuple[np.ndarray, np.ndarray]:
    """Each device's (up, down) bit/s averaged over the rounds' channel realisations."""
    rates = [problem.rates(r, problem.equal_owners() if decision.owners is None else decision.owners[r], decision.power)
             for r in range(problem.rounds)]
    return np.mean([up for up, _ in rates], axis=0), np.mean([down for _, down in rates], axis=0)


def _options(problem: Problem, protocol: str, cuts: list[int], ladder: tuple[str, ...],
             up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, ...]:
    """head, tail (devices, cuts, rungs), server (devices, cuts, 1) seconds per step; error (rungs,)."""
    ranks = problem.ranks
    n, steps = problem.n, problem.steps
    per_cut = [problem.loads(protocol, np.full(n, c), ranks, ["none"] * n) for c in cuts]
    fwd = np.stack([lo.forward_s for lo in per_cut], axis=1)[:, :, None]  # (devices, cuts, 1)
    bwd = np.stack([lo.backward_s for lo in per_cut], axis=1)[:, :, None]
    server = np.stack([lo.server_s for lo in per_cut], axis=1)[:, :, None]
    download = np.stack([lo.download for lo in per_cut], axis=1)[:, :, None]
    upload = np.stack([lo.upload for lo in per_cut], axis=1)[:, :, None]
    sizes = [step_bytes(problem.costs, 0, problem.batch, problem.seq, s, s) for s in ladder]
    act = np.array([s["activations"] for s in sizes])[None, None, :]
    grad = np.array([s["activation_grad"] for s in sizes])[None, None, :]
    control = per_cut[0]
    up3, down3 = up[:, None, None], down[:, None, None]
    head = fwd + BITS * act / up3 + BITS * download / down3 / steps
    tail = (BITS * grad / down3 + bwd + BITS * control.norm[:, None, None] / up3
            + BITS * control.clip[:, None, None] / down3 + BITS * upload / up3 / steps)
    fits = np.array([[problem.memory(c, int(ranks[u])) <= problem.budget[u] for c in cuts] for u in range(n)])
    head = np.where(fits[:, :, None], head, np.inf)
    error = np.array([expected_relative_error(s) for s in ladder])
    return head, tail, server, error


def _augmented_lagrangian(head: np.ndarray, tail: np.ndarray, server: np.ndarray, error: np.ndarray,
                          max_error: float, iterations: int = 25) -> tuple[np.ndarray, float]:
    """Option index (devices,) into the flattened (cuts x rungs) grid minimising the step time
    max head + sum server + max tail subject to mean error <= max_error; and that time."""
    n = head.shape[0]
    h, t = head.reshape(n, -1), tail.reshape(n, -1)
    s = np.broadcast_to(server, head.shape).reshape(n, -1)
    e = np.broadcast_to(error[None, None, :], head.shape).reshape(n, -1)[0]

    def value(choice: np.ndarray) -> float:
        rows = np.arange(n)
        return float(h[rows, choice].max() + s[rows, choice].sum() + t[rows, choice].max())

    # Incumbent: the fastest option of each device among the exact (error 0) ones.
    exact = np.where(e[None, :] <= 0.0, h + s + t, np.inf)
    best = np.argmin(exact, axis=1)
    best_value = value(best)
    scale = max(best_value, 1e-12)
    h, t, s = h / scale, t / scale, s / scale
    lam, mu, nu, rho = np.zeros(n), np.zeros(n), 0.0, 1.0
    rows = np.arange(n)
    t_h, t_t = h[rows, best].max(), t[rows, best].max()
    mean_error = 0.0

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
        error_weight = max(0.0, nu + rho * (mean_error - max_error)) / n
        cost = s + penalty(h - t_h, lam) + penalty(t - t_t, mu) + error_weight * e[None, :]
        cost = np.where(np.isfinite(h), cost, np.inf)
        choice = np.argmin(cost, axis=1)
        heads, tails = h[rows, choice], t[rows, choice]
        t_h, t_t = epigraph(heads, lam), epigraph(tails, mu)
        mean_error = float(e[choice].mean())
        lam = np.maximum(0.0, lam + rho * (heads - t_h))
        mu = np.maximum(0.0, mu + rho * (tails - t_t))
        nu = max(0.0, nu + rho * (mean_error - max_error))
        rho = min(rho * 1.5, 1e4)
        if mean_error <= max_error + 1e-12 and value(choice) * scale < best_value:
            best, best_value = choice.copy(), value(choice) * scale
    return best, best_value


def slow_timescale(problem: Problem, protocol: str, ladder: tuple[str, ...], max_error: float,
                   up: np.ndarray, down: np.ndarray, common_cut: bool) -> Decision:
    """Cuts and codecs: per device, or one cut for all (each common cut solved, best kept)."""
    limit = problem.total_layers - 1
    best: tuple[float, Decision] | None = None
    groups = [[c] for c in range(1, limit + 1)] if common_cut else [list(range(1, limit + 1))]
    for cuts in groups:
        head, tail, server, error = _options(problem, protocol, cuts, ladder, up, down)
        if not np.all(np.isfinite(head).any(axis=(1, 2))):
            continue  # some device cannot hold this cut
        choice, step = _augmented_lagrangian(head, tail, server, error, max_error)
        cut_index, rung = np.unravel_index(choice, head.shape[1:])
        decision = Decision(protocol, np.array([cuts[i] for i in cut_index]), problem.ranks.copy(),
                            [ladder[k] for k in rung])
        if best is None or step < best[0]:
            best = (step, decision)
    assert best is not None  # cut 1 fits every device (Problem checked it)
    return best[1]


def fast_timescale(problem: Problem, decision: Decision, polish: bool = True) -> Decision:
    """Subchannels for every round's channel realisation (SLSQP when ``polish``)."""
    loads = problem.loads(decision.protocol, decision.cuts, decision.ranks, decision.specs)
    decision.owners = [slsqp_owners(problem, decision.protocol, loads, r, polish) for r in range(problem.rounds)]
    return decision


def solve(problem: Problem, ladder: tuple[str, ...], max_error: float, allocate: bool) -> Decision:
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
        decision = Decision(protocol, incumbent.cuts, incumbent.ranks, incumbent.specs)
        passes = 2 if allocate else 1
        for index in range(passes):
            up, down = _mean_rates(problem, decision)
            decision = slow_timescale(problem, protocol, ladder, max_error, up, down, common)
            if allocate:
                decision = fast_timescale(problem, decision, polish=index == passes - 1)
        if protocol == per_device and len(set(decision.cuts.tolist())) == 1:
            decision.protocol = config_protocol  # one cut after all: keep the configured protocol's server side
        delay = problem.mean_delay(decision)
        if delay < best_delay:
            best, best_delay = decision, delay
    return best


def sft(problem: Problem, options: PlanOptions) -> Decision:
    """Per-device cut and codec (slow) and per-round subchannels (fast), under ``options.max_error``."""
    return solve(problem, LADDER, options.max_error, allocate=True)
