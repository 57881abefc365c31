"""Teacher rollout and LSD / LSD+ fitting (DESIGN §6; Learnable Sampler Distillation, arXiv 2509.19962).

Two objectives share the teacher rollout, which runs through the one engine loop:

- ``teacher-path``: the student is judged on the teacher's own states. LSD+ picks the grid that
  minimises the teacher-path decoding loss exactly, by dynamic programming over candidate
  boundaries on the teacher grid; Phi_k maximises the likelihood of the teacher's transition over
  the student interval under the student's one-step kernel.
- ``paper``: the paper read literally. The student rolls out from a (relaxed) copy of the
  teacher's start; Phi_k aligns the student's score with the teacher's at the same time
  (eq. 5-6), and LSD+ aligns kappa_k-weighted student mass with the teacher's mass over the
  student interval.

Gradients reach only Phi (and kappa); draws are never differentiated.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from lsdtool import recipes, rng, steprules
from lsdtool.errors import LsdError
from lsdtool.sharding import shard_range
from lsdtool.diffusion import graph_of
from lsdtool.samplers import DEFAULT_EPS, Sampler, iterate, sample, uniform_grid

_NLL_BLOCK = 1 << 24  # float64 elements (128 MiB) of step probabilities per back-propagated block
_PAPER_MEMORY = 2 << 30  # bytes of cached teacher mass the paper objective may hold
_SCORE_MEMORY = 1 << 30  # bytes of model outputs kept between evaluations of the fitting loss


def block_options(recipe: dict, student: bool = False) -> dict:
    """The block options (:mod:`lsdtool.blocks`) of the recipe's teacher, or of its student (``student``: counts
    follow the learned grid with LSD+, else LLaDA's even split); {} without a gen length."""
    if not recipe.get("gen_length"):
        return {}
    gen = recipe["gen_length"]
    options = {"gen_length": gen, "block_length": recipe.get("block_length") or gen}
    if student and recipe.get("plus"):
        options["counts"] = "noise"
    return options


@dataclass
class FitResult:
    sampler: Sampler
    fit: dict


def distill(model, recipe: dict, device=None, world=None, rollouts=None) -> FitResult | None:
    """Fit a ``recipe['steps']``-step sampler for ``model``; returns the sampler and a fit report.
    Keys the recipe leaves out take their defaults. With a :class:`lsdtool.distributed.World` every
    rank rolls out its block of the trajectories and rank 0 fits on all of them; the other ranks return None.
    ``rollouts`` (a :class:`lsdtool.rollouts.Store`) hands out teacher rollouts it already holds."""
    from lsdtool.generation import pick_device

    recipe = recipes.complete(recipe)
    if steprules.rule(recipe["base"]).commits and recipe["mode"] == "score":  # a score scale cancels in their softmax
        recipe = {**recipe, "mode": "temperature"}
    dev = pick_device(device)
    from lsdtool.grids import blocks_problem

    problem = blocks_problem(block_options(recipe), recipe["steps"])
    if problem:
        raise LsdError(problem)
    problem = objective_problem(recipe["objective"], model)
    if problem:
        raise LsdError(f"{problem}; use objective = \"teacher-path\"")
    if hasattr(model, "to"):
        model.to(dev)
    start = time.time()
    if recipe["iters"] == 0:  # untrained: the base sampler itself (no rollout; rank 0 writes it)
        if world is not None and world.rank != 0:
            return None
        return FitResult(Sampler.plain(recipe["steps"], recipe["base"], recipe["mode"], options=block_options(recipe)),
                         {"iterations": 0, "objective": recipe["objective"]})
    paper = recipe["objective"] == "paper"
    rollout = (rollouts or TeacherRollout)(model, recipe, dev, collect_mass=paper and recipe["plus"], world=world)
    if world is not None and world.rank != 0:
        return None
    rolled = time.time()
    fit = fit_teacher_path(rollout, recipe) if recipe["objective"] == "teacher-path" else fit_paper(rollout, recipe)
    fit.fit.update({"objective": recipe["objective"], "seconds": round(time.time() - start, 2), "device": str(dev),
                    "teacher_steps": rollout.n_steps, "samples": rollout.n_samples,
                    "rollout_seconds": round(rolled - start, 2), "ranks": world.size if world is not None else 1})
    fit.sampler.check()
    return fit


def objective_problem(objective: str, model) -> str | None:
    """Why ``objective`` cannot fit a sampler for ``model`` (the paper objective compares scores at masked
    rows, so it needs a graph with a mask), or None."""
    if objective == "paper" and not graph_of(model).absorbing:
        return "the paper objective is implemented for absorbing models"
    return None


class TeacherRollout:
    """Teacher trajectories from the recipe's seed, reduced to what fitting needs.

    Kept per sample (S samples, L positions): the states at K+1 candidate boundaries on the teacher
    grid (long), the final tokens, and for absorbing models the step at which each position was
    revealed and the teacher's log-probability of the revealed token at that moment.
    """

    def __init__(self, model, recipe: dict, device, collect_mass: bool = False, world=None):
        self._setup(model, recipe, device)
        if world is None:
            self.mass = self._mass_buffer(self.n_samples) if collect_mass else None
            self._run(range(self.n_samples), recipe["batch"])
        else:
            self._run_distributed(world, recipe["batch"], collect_mass)
        self.final = self.states[-1]

    @classmethod
    def restored(cls, model, recipe: dict, device, states, reveal_step, reveal_logp) -> "TeacherRollout":
        """A rollout of ``recipe`` from trajectories kept earlier (:mod:`lsdtool.rollouts`), without rolling out."""
        r = cls.__new__(cls)
        r._setup(model, recipe, device)
        r.mass, r.states, r.reveal_step, r.reveal_logp = None, states, reveal_step, reveal_logp
        r.final = r.states[-1]
        return r

    def _setup(self, model, recipe: dict, device) -> None:
        """What a rollout knows before it runs: the teacher, its candidate boundaries and times, the graph."""
        self.model, self.device = model, device
        self.n_steps = recipe["teacher_steps"]
        self.n_samples = recipe["samples"]
        self.seed = recipe["seed"]
        self.options = block_options(recipe)
        self.teacher = Sampler.plain(self.n_steps, base=recipe["base"], options=self.options)
        self.teacher.check()  # the teacher's steps must divide into the blocks
        self.conditions = None
        if self.options:  # prompted block decoding: the prompts fix the start and set the sequence length
            from lsdtool import prompts

            self.conditions = prompts.prompted(model, self.options["gen_length"], prompts=recipe["prompts"] or None)
        # every block boundary is a candidate too, so "before" is measured on the same footing
        self.candidates = torch.unique(torch.cat([candidate_steps(recipe), self.block_bounds()]))
        self.times = self.teacher.timesteps[self.candidates]  # (K+1,) float64
        self.graph = graph_of(model)
        self.absorbing = self.graph.absorbing
        self._scores: dict[tuple, torch.Tensor] = {}
        self._score_bytes = 0

    def block_bounds(self) -> torch.Tensor:
        """Teacher step indices where its blocks start (and the last one ends); empty without blocks."""
        if not self.options:
            return torch.zeros(0, dtype=torch.long)
        n_blocks = self.options["gen_length"] // self.options["block_length"]
        return torch.arange(n_blocks + 1) * (self.n_steps // n_blocks)

    def start(self, index: torch.Tensor):
        """(x_init, fixed) of the trajectories ``index``: the prompts (cycled over the trajectories), or (None, None)."""
        if self.conditions is None:
            return None, None
        from lsdtool import conditioning

        given = self.conditions.given([i % len(self.conditions) for i in index.tolist()]).to(index.device)
        return conditioning.start(self.model, index, self.seed, given)

    def _uniform_steps(self, steps: int) -> torch.Tensor:
        """Teacher step indices of the plain student grid with ``steps`` steps."""
        return _uniform_steps(self.n_steps, steps, self.teacher.base)

    def uniform_path(self, steps: int) -> list[int]:
        """Candidate indices of the uniform student grid (it is always among the candidates)."""
        return [int(torch.nonzero(self.candidates == c)) for c in self._uniform_steps(steps)]

    def _mass_buffer(self, rows: int) -> torch.Tensor:
        """Teacher mass per candidate interval, sum over its teacher steps of (t - s) sigma'(t) s*(x*_t, t)
        at masked rows: (K, rows, L, V) float32, for the paper objective's LSD+ term."""
        kk, s = len(self.candidates) - 1, self.n_samples
        l, v = self.model.seq_len, self.model.vocab_size
        if kk * s * l * v * 4 > _PAPER_MEMORY:  # the whole buffer ends up on one rank
            raise LsdError(f"the paper objective would cache {kk * s * l * v * 4 / 2**30:.1f} GiB of teacher mass; "
                           "lower samples or candidates, or use objective = \"teacher-path\"")
        return torch.zeros(kk, rows, l, v, dtype=torch.float32)

    def moving_scores(self, a: int, rows: slice, moving: torch.Tensor, tag=None) -> torch.Tensor:
        """The model's log score (R, V) at the moving rows of candidate state a, computed once while
        the memory budget allows (fitting evaluates the same rows many times); ``tag`` names a subset of them."""
        key = (a, rows.start, rows.stop, tag)
        if key in self._scores:
            return self._scores[key]
        x = self.states[a, rows].to(self.device)
        with torch.no_grad():
            ls = self.model.log_score(x, self.times[a].to(self.device, torch.float32).expand(x.shape[0]))[moving]
        if self._score_bytes + ls.numel() * ls.element_size() <= _SCORE_MEMORY:
            self._scores[key] = ls
            self._score_bytes += ls.numel() * ls.element_size()
        return ls

    def forget_scores(self, a: int) -> None:
        for key in [k for k in self._scores if k[0] == a]:
            self._score_bytes -= self._scores[key].numel() * self._scores[key].element_size()
            del self._scores[key]

    def _run(self, rows: range, batch: int, visible: bool = True):
        """Roll out the trajectories with global indices ``rows`` (a contiguous block), in batches of
        ``batch`` cut where a single process cuts them, into summaries indexed from ``rows.start``."""
        from lsdtool.console import progress

        model, n, l = self.model, len(rows), self.model.seq_len
        cands = self.candidates.tolist()
        pos_of = {c: i for i, c in enumerate(cands)}
        self.states = torch.empty(len(self.candidates), n, l, dtype=torch.long)
        self.reveal_step = torch.full((n, l), self.n_steps - 1, dtype=torch.long)
        self.reveal_logp = torch.zeros(n, l, dtype=torch.float64)
        graph = self.graph
        with progress() as bar, torch.no_grad():
            task = bar.add_task("teacher rollout", total=n * self.n_steps, visible=visible)
            for b0 in range(rows.start, rows.stop, batch):
                index = torch.arange(b0, min(rows.stop, b0 + batch), device=self.device)
                local = slice(b0 - rows.start, b0 - rows.start + index.shape[0])
                interval = 0
                for step in iterate(model, self.teacher, index, self.seed, *self.start(index)):
                    if step.stage != 0:  # a rule's further calls (tau-leaping's final argmax) are not teacher steps
                        del step
                        continue
                    if step.k in pos_of:
                        self.states[pos_of[step.k], local] = step.x.cpu()
                    while step.k >= cands[interval + 1]:
                        interval += 1
                    if self.absorbing:
                        revealed = graph.moving(step.x) & ~graph.moving(step.x_next)
                        if revealed.any():
                            logp = _token_logp(graph, step.log_score, step.x_next, revealed)
                            rev = revealed.cpu()
                            self.reveal_step[local][rev] = step.k  # a slice of rows is a view: writes land
                            self.reveal_logp[local][rev] = logp.cpu()
                    if self.mass is not None:
                        rate = float((step.t - step.s) * model.noise.rate(step.t))
                        moving = graph.moving(step.x).float()[..., None]
                        self.mass[interval, local] += (rate * step.log_score.exp().float() * moving).cpu()
                    bar.advance(task, index.shape[0])
                    last = step.x_next
                    del step  # the next teacher call must not overlap this step's (B, L, V) scores
                self.states[-1, local] = last.cpu()

    def _run_distributed(self, world, batch: int, collect_mass: bool):
        """This rank's block of :func:`rollout_rows`, then every block gathered on
        rank 0 in index order: the same tensors a single process computes."""
        blocks = [rollout_rows(self.n_samples, batch, r, world.size) for r in range(world.size)]
        mine = blocks[world.rank]

        def run():
            self.mass = self._mass_buffer(len(mine)) if collect_mass else None
            self._run(mine, batch, visible=world.rank == 0)

        world.agree("rolling out the teacher", run)
        counts = [len(b) for b in blocks]
        parts = {"states": 1, "reveal_step": 0, "reveal_logp": 0} | ({"mass": 1} if self.mass is not None else {})
        for name, dim in parts.items():  # (the other ranks keep their own block)
            whole = world.gather_rows(getattr(self, name), dim, counts)
            if world.rank == 0:
                setattr(self, name, whole)


def _uniform_steps(n_steps: int, steps: int, base: str = "euler") -> torch.Tensor:
    """Teacher step indices of the plain student grid with ``steps`` steps on the ``n_steps`` teacher grid (the
    nearest teacher times where the rule has a grid of its own)."""
    if steprules.rule(base).grid is None:
        return torch.round(torch.linspace(0, n_steps, steps + 1, dtype=torch.float64)).long()
    teacher, student = Sampler.plain(n_steps, base=base).timesteps, Sampler.plain(steps, base=base).timesteps
    return (teacher[:, None] - student[None, :]).abs().argmin(0)


def candidate_steps(recipe: dict) -> torch.Tensor:
    """(K+1,) teacher step indices where the rollout keeps states, the state at index c being the state
    before step c: ``candidates`` evenly spaced ones and the uniform student grid, so "before" is
    measured on the same footing."""
    n = recipe["teacher_steps"]
    k = min(recipe["candidates"], n)
    cands = torch.unique(torch.round(torch.linspace(0, n, k + 1, dtype=torch.float64)).long())
    return torch.unique(torch.cat([cands, _uniform_steps(n, recipe["steps"], recipe["base"])]))


def rollout_rows(n: int, batch: int, rank: int, size: int) -> range:
    """The global trajectory indices rank ``rank`` of ``size`` rolls out: whole batches of the
    single-process run when there are at least as many batches as ranks (so every model call sees the
    same rows as in one process), else an even split of 0..n-1."""
    batches = -(-n // batch)
    if batches < size:
        return shard_range(n, rank, size)
    block = shard_range(batches, rank, size)
    return range(block.start * batch, min(n, block.stop * batch))


def _token_logp(graph, log_score, tokens, rows):
    """log p(token | x) at the selected masked rows: log-softmax of the score over real tokens; -> (R,)."""
    ls = graph.real_columns(log_score[rows])
    picked = ls.gather(-1, graph.real_index(tokens[rows])[:, None]).squeeze(-1).double()
    return picked - torch.logsumexp(ls.double(), -1)  # no (R, V) log-softmax copy


def _batches(n: int, size: int):
    for b0 in range(0, n, size):
        yield slice(b0, min(n, b0 + size))


# ---------------------------------------------------------------------------------------------
# teacher-path objective


def decoding_costs(rollout: TeacherRollout, batch: int) -> torch.Tensor:
    """C[a, b] (K+1, K+1) float64: summed over samples, sum over tokens revealed by the teacher in
    candidate interval a..b-1 of log p(y | x*_reveal) - log p(y | x*_a); inf where b <= a. Kept on the
    rollout (``decoding_cost``), so fits of other step counts on the same rollout reuse it."""
    if getattr(rollout, "decoding_cost", None) is not None:
        return rollout.decoding_cost.clone()
    model, cands, kk = rollout.model, rollout.candidates, len(rollout.candidates)
    bins = torch.searchsorted(cands, rollout.reveal_step, right=True) - 1  # (S, L) candidate interval of each reveal
    per_bin = torch.zeros(kk, kk, dtype=torch.float64)  # [a, j]: sum over tokens revealed in bin j of lp_reveal - lp_a
    graph = rollout.graph
    with torch.no_grad():
        for a in range(kk - 1):
            t = rollout.times[a].to(torch.float32)
            for rows in _batches(rollout.n_samples, batch):
                x = rollout.states[a, rows].to(rollout.device)
                masked = graph.moving(x)
                if not masked.any():
                    continue
                ls = model.log_score(x, t.to(rollout.device).expand(x.shape[0]))
                lp_a = _token_logp(graph, ls, rollout.final[rows].to(rollout.device), masked).cpu()
                gain = rollout.reveal_logp[rows][masked.cpu()] - lp_a
                per_bin[a].index_add_(0, bins[rows][masked.cpu()], gain)
    cost = torch.full((kk, kk), math.inf, dtype=torch.float64)
    cum = per_bin.cumsum(1)  # C[a, b] = sum_{j=a}^{b-1} per_bin[a, j]
    for a in range(kk - 1):
        cost[a, a + 1 :] = cum[a, a : kk - 1]
    rollout.decoding_cost = cost.clone()
    return cost


def kernel_costs(rollout: TeacherRollout, recipe: dict, batch: int) -> torch.Tensor:
    """C[a, b]: minus the log-likelihood of the teacher's move x*_a -> x*_b under one plain student
    step from t_a to t_b, summed over samples (the uniform-graph schedule cost)."""
    kk = len(rollout.candidates)
    cost = torch.full((kk, kk), math.inf, dtype=torch.float64)
    for a in range(kk - 1):
        for b in range(a + 1, kk):
            cost[a, b] = sum(interval_nll(rollout, a, b, torch.ones((), dtype=torch.float64), recipe, b == kk - 1, rows)
                             for rows in _batches(rollout.n_samples, batch)).item()
    return cost


def blockwise_path(rollout: TeacherRollout, cost: torch.Tensor, steps: int) -> list[int]:
    """:func:`best_path` within each block: the same number of steps per block, boundaries on the blocks'."""
    cands = rollout.candidates.tolist()
    bounds = [cands.index(int(c)) for c in rollout.block_bounds()]
    per = steps // (len(bounds) - 1)
    path = [0]
    for lo, hi in zip(bounds, bounds[1:]):
        path += [lo + q for q in best_path(cost[lo : hi + 1, lo : hi + 1], per)[1:]]
    return path


def best_path(cost: torch.Tensor, steps: int) -> list[int]:
    """Indices 0 = c_0 < ... < c_M = K minimising sum_m cost[c_m, c_{m+1}] (exact DP, O(M K^2))."""
    kk = cost.shape[0]
    if steps > kk - 1:
        raise LsdError(f"cannot place {steps} steps on {kk - 1} candidate intervals; raise candidates or teacher_steps")
    best = torch.full((steps + 1, kk), math.inf, dtype=torch.float64)
    arg = torch.zeros(steps + 1, kk, dtype=torch.long)
    best[0, 0] = 0.0
    for m in range(1, steps + 1):
        total = best[m - 1][:, None] + cost  # [a, b]
        best[m], arg[m] = total.min(0)
    path = [kk - 1]
    for m in range(steps, 0, -1):
        path.append(int(arg[m, path[-1]]))
    return path[::-1]


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely and Rizzo) between sample sets x (n, D) and y (m, D), float64."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def search_grid(rollout: TeacherRollout, recipe: dict, start: list[int], sweeps: int = 3, tries: int = 8):
    """LSD+ for Poisson-jump (ordinal) kernels: coordinate descent of the inner grid points over the candidate
    boundaries, minimising the energy distance between the student's final samples (Phi = 1, run from the
    teacher's start states with one seed for every grid) and the teacher's. The teacher-path likelihood cannot
    choose this grid: it charges nats for every jump of the mixing phase, where errors are forgotten, and
    almost nothing for the few late jumps that make the image. Returns (path, [loss of start], [loss of path])."""
    levels = rollout.graph.n_real - 1
    teacher = rollout.final.to(torch.float64) / levels
    seen: dict[tuple, float] = {}

    def loss(path: list[int]) -> float:
        key = tuple(path)
        if key not in seen:
            sampler = Sampler(rollout.times[path].clone(), torch.ones(len(path) - 1, dtype=torch.float64),
                              recipe["base"], recipe["mode"])
            finals = []
            for rows in _batches(rollout.n_samples, recipe["batch"]):
                index = torch.arange(rows.start, rows.stop, device=rollout.device)
                finals.append(sample(rollout.model, sampler, index, recipe["seed"] + 1,
                                     x_init=rollout.states[0, rows].to(rollout.device)).cpu())
            seen[key] = energy_distance(torch.cat(finals).to(torch.float64) / levels, teacher)
        return seen[key]

    path, best = list(start), loss(start)
    for _ in range(sweeps):
        moved = False
        for i in range(1, len(path) - 1):
            lo, hi = path[i - 1] + 1, path[i + 1] - 1
            for c in torch.linspace(lo, hi, min(tries, hi - lo + 1)).round().long().unique().tolist():
                trial = path[:i] + [c] + path[i + 1 :]
                if loss(trial) < best:
                    path, best, moved = trial, loss(trial), True
        if not moved:
            break
    return path, [loss(start)], [best]


def interval_nll(rollout: TeacherRollout, a: int, b: int, coeff: torch.Tensor, recipe: dict, final: bool, rows,
                 grad_scale: float | None = None) -> torch.Tensor:
    """-sum log p_student(x*_b | x*_a) for one student step t_a -> t_b with coefficient ``coeff``, over
    the samples ``rows``; the model sees the teacher's state. With ``grad_scale`` each block of moving
    rows back-propagates grad_scale x its NLL into ``coeff`` (a leaf) as it goes and the NLL comes back
    detached: one block's float64 (rows, V) graph is held at a time, not the whole interval's."""
    model, dev = rollout.model, rollout.device
    graph = rollout.graph
    x = rollout.states[a, rows].to(dev)
    moving = graph.moving(x)
    commit = steprules.rule(recipe["base"]).commits
    if commit:  # the commit set is taken as given: the likelihood of the tokens the teacher committed
        moving = moving & ~graph.moving(rollout.states[b, rows].to(dev))
    total = torch.zeros((), dtype=torch.float64)
    if not moving.any():
        return total
    t, s = rollout.times[a].to(dev), rollout.times[b].to(dev)
    ls = rollout.moving_scores(a, rows, moving, b if commit else None)
    x, target = graph.to_canonical(x[moving]), graph.to_canonical(rollout.states[b, rows].to(dev)[moving])
    kernel = steprules.rule(recipe["base"]).one_step_kernel(t, s, recipe["base"], coeff.to(dev), recipe["mode"], final)
    canon = graph.canonical_graph()
    block = max(1, _NLL_BLOCK // model.vocab_size)
    for i in range(0, x.shape[0], block):
        j = slice(i, i + block)
        ls_j = graph.canonical_scores(ls[j])
        nll = -kernel.log_prob(canon, model.noise, ls_j, x[j], target[j]).sum().cpu()
        if grad_scale is not None and nll.requires_grad:
            (nll * grad_scale).backward()
            nll = nll.detach()
        total = total + nll
    return total


def fit_coeffs(rollout: TeacherRollout, path: list[int], recipe: dict) -> tuple[torch.Tensor, list, list]:
    """Phi_k = argmax of the teacher's interval likelihood, per step (each Phi_k only enters its own
    term, so steps are fitted independently): full-batch L-BFGS on log Phi, ``iters`` iterations at
    most. Returns Phi (M,), NLL per sample before (Phi = 1) and after."""
    from lsdtool.console import progress

    steps, n = len(path) - 1, rollout.n_samples
    coeffs, before, after = [], [], []

    def nll(k, phi, grad_scale=None):
        a, b = path[k], path[k + 1]
        return sum(interval_nll(rollout, a, b, phi, recipe, k == steps - 1, r, grad_scale)
                   for r in _batches(n, recipe["batch"])) / n

    with progress() as bar:
        task = bar.add_task("fitting coefficients", total=steps)
        for k in range(steps):
            one = torch.ones((), dtype=torch.float64)
            with torch.no_grad():
                before.append(float(nll(k, one)))
            log_phi = torch.zeros((), dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([log_phi], lr=1.0, max_iter=recipe["iters"], line_search_fn="strong_wolfe")

            def closure():  # gradients accumulate block by block into Phi, then d/dlog Phi = Phi d/dPhi
                opt.zero_grad()
                phi = log_phi.detach().exp().requires_grad_()
                loss = nll(k, phi, grad_scale=1 / n)
                if phi.grad is not None:  # else the teacher moves no position here and Phi_k stays 1
                    log_phi.grad = phi.grad * phi.detach()
                return loss

            opt.step(closure)
            phi = log_phi.detach().exp()
            with torch.no_grad():
                after.append(float(nll(k, phi)))
            if not after[-1] <= before[-1]:  # never worse than Phi = 1 (and never NaN)
                phi, after[-1] = one, before[-1]
            coeffs.append(phi)
            rollout.forget_scores(path[k])
            bar.advance(task)
    return torch.stack(coeffs), before, after


def fit_teacher_path(rollout: TeacherRollout, recipe: dict) -> FitResult:
    steps, batch = recipe["steps"], recipe["batch"]
    uniform = rollout.uniform_path(steps)
    fit: dict = {}
    path = uniform
    if recipe["plus"] and steprules.rule(recipe["base"]).kernel == "poisson-jumps":
        path, fit["schedule_loss_before"], fit["schedule_loss_after"] = search_grid(rollout, recipe, uniform)
        fit["schedule_loss"] = "energy distance of the student's final samples to the teacher's (levels in [0, 1])"
    elif recipe["plus"]:
        cost = decoding_costs(rollout, batch) if rollout.absorbing else kernel_costs(rollout, recipe, batch)
        path = blockwise_path(rollout, cost, steps) if rollout.options else best_path(cost, steps)
        per = lambda p: [float(cost[p[i], p[i + 1]]) / rollout.n_samples for i in range(steps)]  # noqa: E731
        fit["schedule_loss_before"], fit["schedule_loss_after"] = per(uniform), per(path)
    coeffs, before, after = fit_coeffs(rollout, path, recipe)
    timesteps = rollout.times[path].clone() if recipe["plus"] else Sampler.plain(steps, base=recipe["base"]).timesteps
    sampler = Sampler(timesteps, coeffs.double(), recipe["base"], recipe["mode"],
                      options=block_options(recipe, student=True))
    if recipe["plus"]:
        # "before" is the untrained sampler (uniform grid, Phi = 1), measured by the same likelihood.
        fit["loss_schedule_only"] = before
        before = [float(interval_nll(rollout, uniform[k], uniform[k + 1], torch.ones((), dtype=torch.float64),
                                     recipe, k == steps - 1, slice(0, rollout.n_samples))) / rollout.n_samples
                  for k in range(steps)]
    fit["loss_before"], fit["loss_after"] = before, after
    fit["iterations"] = recipe["iters"]
    fit["loss"] = "teacher transition NLL per sample (nats)"
    return FitResult(sampler, fit)


# ---------------------------------------------------------------------------------------------
# paper objective


def _relaxed_start(rollout: TeacherRollout, rows: slice, recipe: dict, it: int) -> torch.Tensor:
    """The teacher's start (all mask) with ceil(zeta L) positions filled: with the teacher's final
    tokens (``fill = teacher``) or uniform random tokens (``fill = uniform``)."""
    x = rollout.states[0, rows].clone()
    if not recipe["relax"]:
        return x
    b, l = x.shape
    n_fill = math.ceil(recipe["zeta"] * l)
    index = torch.arange(rows.start, rows.start + b)
    u = rng.uniforms(recipe["seed"] + it, rng.STREAM_FIT, index, 0, l)
    chosen = u.argsort(-1)[:, :n_fill]
    if recipe["fill"] == "teacher":
        fill = rollout.final[rows].gather(1, chosen)
    else:
        v = rng.uniforms(recipe["seed"] + it, rng.STREAM_FIT, index, 1, n_fill)
        fill = rollout.graph.real_token((v * rollout.graph.n_real).long())
    return x.scatter(1, chosen, fill)


def paper_score_loss(log_score: torch.Tensor, target: torch.Tensor, phi: torch.Tensor, mode: str) -> torch.Tensor:
    """LSD eq. 6 with d = MSE: |Phi s - s*|^2 (score mode) or |exp(Phi log s) - s*|^2 (temperature mode),
    normalised by |s*|^2 so every step weighs alike; log_score, target (R, V)."""
    student = log_score.exp() * phi if mode == "score" else (log_score * phi).exp()
    return ((student - target) ** 2).mean() / (target**2).mean().clamp_min(1e-30)


def fit_paper(rollout: TeacherRollout, recipe: dict) -> FitResult:
    """Adam on log Phi (and kappa logits for LSD+) against the paper's per-step losses."""
    from lsdtool.console import progress

    model, dev = rollout.model, rollout.device
    steps, n = recipe["steps"], rollout.n_samples
    t0, eps = 1.0, float(rollout.times[-1])
    log_phi = torch.zeros(steps, dtype=torch.float64, requires_grad=True)
    logits = torch.zeros(steps, dtype=torch.float64, requires_grad=recipe["plus"])
    params = [log_phi] + ([logits] if recipe["plus"] else [])
    opt = torch.optim.Adam(params, lr=recipe["lr"])
    history = []
    graph = rollout.graph
    cand_t = rollout.times.to(torch.float64)
    with progress() as bar:
        task = bar.add_task("fitting (paper objective)", total=recipe["iters"])
        for it in range(recipe["iters"]):
            rows = slice((it * recipe["batch"]) % n, min(n, (it * recipe["batch"]) % n + recipe["batch"]))
            taus = grid_from_logits(logits, t0, eps) if recipe["plus"] else uniform_grid(steps)
            sampler = Sampler(taus.detach(), log_phi.detach().exp(), recipe["base"], recipe["mode"])
            index = torch.arange(rows.start, rows.stop, device=dev)
            x0 = _relaxed_start(rollout, rows, recipe, it).to(dev)
            losses = []
            for step in iterate(model, sampler, index, recipe["seed"] * 7919 + it + 1, x_init=x0, grad=recipe["plus"], timesteps=taus):
                k = step.k
                c = int(torch.argmin((cand_t - taus[k].detach()).abs()))  # the teacher's state nearest the student time
                xt = rollout.states[c, rows].to(dev)
                both = graph.moving(step.x) & graph.moving(xt)
                if not both.any():
                    continue
                with torch.no_grad():
                    target = graph.real_columns(model.log_score(xt, taus[k].detach().float().expand(xt.shape[0]))[both]).double().exp()
                ls = graph.real_columns(step.log_score[both]).double()
                loss = paper_score_loss(ls, target, log_phi[k].exp(), recipe["mode"])
                if rollout.mass is not None:
                    c_next = int(torch.argmin((cand_t - taus[k + 1].detach()).abs()))
                    mass = graph.real_columns(rollout.mass[c:max(c + 1, c_next), rows].sum(0).to(dev)[both]).double()
                    kappa = taus[k] - taus[k + 1]
                    pred = kappa * model.noise.rate(taus[k]) * ls.exp()
                    loss = loss + ((pred - mass) ** 2).mean() / (mass**2).mean().clamp_min(1e-30)
                losses.append(loss)
            if losses:
                total = torch.stack(losses).sum()
                opt.zero_grad()
                total.backward()
                opt.step()
                history.append(float(total.detach()))
            bar.advance(task)
    taus = grid_from_logits(logits.detach(), t0, eps) if recipe["plus"] else uniform_grid(steps)
    sampler = Sampler(taus, log_phi.detach().exp(), recipe["base"], recipe["mode"])
    fit = {"iterations": recipe["iters"], "loss": "paper objective (normalised MSE, summed over steps)",
           "loss_before": history[:1], "loss_after": history[-1:], "history": history[:: max(1, len(history) // 50)]}
    return FitResult(sampler, fit)


def grid_from_logits(logits: torch.Tensor, t0: float = 1.0, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """tau_0 = t0 > ... > tau_M = eps with steps kappa = (t0 - eps)(floor/M + (1 - floor) softmax(logits)):
    every step is at least a thousandth of the uniform one, so the grid is strictly decreasing by construction."""
    floor = 1e-3
    kappa = (t0 - eps) * (floor / logits.shape[0] + (1 - floor) * torch.softmax(logits, 0))
    taus = t0 - torch.cat([torch.zeros(1, dtype=kappa.dtype), kappa.cumsum(0)])
    return torch.cat([taus[:-1], torch.full((1,), eps, dtype=kappa.dtype)])


__all__ = ["FitResult", "distill", "best_path", "grid_from_logits", "uniform_grid"]
