"""The mixed loss over a vocabulary sharded across the processes of a ``torch.distributed`` group
(tensor parallel: each rank holds logits ``[N, V_r]`` and embedding rows ``[V_r, H]`` of one
contiguous range of the vocabulary), computed with collectives: by the reference's formulation
throughout (``_rows``, the oracle), or with a kernel backend doing the passes over the shard's
logits (``_kernel_rows``: the kernel's per-row log-sum-exp of the shard and its softmax gradient,
``_ShardPasses``).

Every rank passes the same labels and gets the same per-position rows, hence the same loss; the
backward then gives each rank the gradient of that loss with respect to its own shards. The
collectives (docs/vocab_parallel.md has the cost model):

- the row maximum (all-reduce max; the kernel path: the maximum of the ranks' log-sum-exps), the
  sum of exponentials, the target logit and, with label smoothing, the row sum (all-reduce sum):
  N floats each;
- S: each rank's K' best candidates (value, global index) gathered from every rank and merged
  by the tie rule of docs/spec.md (the lower *global* index wins); the argmax with them;
- mu: the sum of exp((z_i - m) / T) over the ranks' members of S (all-reduce of N), then the
  per-rank partial sums of w_i E[i] (all-reduce of N * H); e = E[y] from the rank that owns y.

An all-reduce whose result every rank then uses alike has the identity as its backward: each
rank's downstream computation is the same function of the same reduced values, so the gradient
arriving there is already the global one (Megatron-LM's "reduce from the tensor-parallel
region"). The softmax normaliser over S is used by each rank in its own terms, so its gradient
is summed over the ranks (``sum_for_local_use``: s-bar, N floats). That needs every rank to run
the backward of the same loss, and it is not a higher-order derivative: a backward with
``create_graph=True`` raises :class:`~fused_cosloss.UnsupportedDifferentiationError`.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from . import compiler_marks
from .autograd import kernel_layouts
from .errors import UnsupportedDifferentiationError
from .options import LossOptions
from .reference import (Float32MatMul, WeightedRowSum, autocast_off, compute_dtype, cosine, select_topk,
                        transformed_logits)

NO_HIGHER_ORDER = ("mixed_loss: with process_group (a vocabulary sharded across processes) the gradient is exact for "
                   "one backward of the same loss on every rank, not for create_graph=True (a higher-order gradient "
                   "would need the other ranks' vectors); compute it without process_group on the gathered vocabulary")


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's part of the vocabulary: global rows ``[start, start + size)`` of ``vocab``."""

    group: object
    start: int
    size: int
    vocab: int

    def owns(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels >= self.start) & (labels < self.start + self.size)


def check_process_group(process_group, vocab_start) -> None:
    """Type checks of the two arguments (no communication)."""
    if process_group is None:
        if vocab_start is not None:
            raise ValueError(f"vocab_start: expected None without process_group (it places this rank's shard of a "
                             f"vocabulary sharded across processes), got {vocab_start!r}")
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first (or pass process_group=None)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(...)), got {type(process_group).__name__}")
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):
        raise ValueError(f"vocab_start: expected an integer >= 0 (the global index of this rank's first vocabulary "
                         f"row) or None (the shards in rank order), got {vocab_start!r}")


def collective_device(group, device: torch.device) -> torch.device:
    """Where the group's collectives take tensors (gloo: the CPU; nccl: the current CUDA device)."""
    backend = dist.get_backend(group)
    if backend == "gloo":
        return torch.device("cpu")
    return device


def resolve_shard(group, vocab_start: int | None, local_vocab: int, rows: int, valid_rows: int,
                  device: torch.device) -> VocabShard:
    """This rank's shard, checked against every other rank's (one all-gather of four integers): the
    shards must tile ``[0, V)`` and every rank must pass as many positions (and valid ones), else
    each rank raises the same ``ValueError`` (rather than a collective of mismatched shapes hanging)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([-1 if vocab_start is None else vocab_start, local_vocab, rows, valid_rows],
                        dtype=torch.int64, device=collective_device(group, device))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = [tuple(int(x) for x in item.tolist()) for item in gathered]
    rank = dist.get_rank(group)
    if len({entry[2:] for entry in table}) != 1:
        raise ValueError("labels: expected the same positions on every rank of process_group (the vocabulary is "
                         f"sharded, not the positions); got (positions, valid positions) by rank "
                         f"{[entry[2:] for entry in table]}")
    given = [entry[0] >= 0 for entry in table]
    if any(given) and not all(given):
        raise ValueError("vocab_start: expected it on every rank of process_group or on none; got it on ranks "
                         f"{[r for r, g in enumerate(given) if g]} only")
    sizes = [entry[1] for entry in table]
    starts = [entry[0] for entry in table] if all(given) else [sum(sizes[:r]) for r in range(world)]
    position = 0
    for start, size in sorted(zip(starts, sizes)):
        if start != position:
            raise ValueError(f"vocab_start: the shards (start, size) by rank {list(zip(starts, sizes))} do not tile "
                             f"the vocabulary [0, {sum(sizes)}) without gaps or overlaps")
        position += size
    return VocabShard(group=group, start=starts[rank], size=sizes[rank], vocab=position)


def _all_reduced(tensor: torch.Tensor, group, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A new tensor: ``tensor`` reduced over the group's ranks on the collectives' ``device``, back on its own."""
    out = tensor.to(device, copy=True)
    dist.all_reduce(out, op=op, group=group)
    return out.to(tensor.device)


class _SumOverShards(torch.autograd.Function):
    """All-reduce sum in the forward, identity in the backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor, group, device):
        return _all_reduced(tensor, group, device)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise UnsupportedDifferentiationError(NO_HIGHER_ORDER)
        return grad, None, None


class _SumOverShardsForLocalUse(torch.autograd.Function):
    """All-reduce sum in the forward and of the gradient in the backward: for a reduced value each
    rank then uses in its own terms (the softmax normaliser over S, which divides each rank's own
    numerators): the loss depends on it through every rank's terms, so its gradient is the sum of
    the ranks' parts (the s-bar of docs/spec.md, an all-reduce of N floats in the backward)."""

    @staticmethod
    def forward(ctx, tensor, group, device):
        ctx.group, ctx.device = group, device
        return _all_reduced(tensor, group, device)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise UnsupportedDifferentiationError(NO_HIGHER_ORDER)
        return _all_reduced(grad, ctx.group, ctx.device), None, None


class _CopyToShards(torch.autograd.Function):
    """Identity in the forward, all-reduce sum of the gradient in the backward: an input every rank
    holds whole (the hidden states of the fused-linear mode) gets the sum of the ranks' parts."""

    @staticmethod
    def forward(ctx, tensor, group, device):
        ctx.group, ctx.device = group, device
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise UnsupportedDifferentiationError(NO_HIGHER_ORDER)
        return _all_reduced(grad, ctx.group, ctx.device), None, None


def copy_to_shards(tensor: torch.Tensor, shard_group) -> torch.Tensor:
    return _CopyToShards.apply(tensor, shard_group, collective_device(shard_group, tensor.device))


class _Collectives:
    """The collectives of one call, on the group's device."""

    def __init__(self, shard: VocabShard, device: torch.device):
        self.shard, self.device = shard, collective_device(shard.group, device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, for a value every rank then uses alike (the backward is the identity)."""
        return _SumOverShards.apply(tensor, self.shard.group, self.device)

    def sum_for_local_use(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, for a value each rank uses in its own terms (the gradient is summed too)."""
        return _SumOverShardsForLocalUse.apply(tensor, self.shard.group, self.device)

    @torch.no_grad()
    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return _all_reduced(tensor, self.shard.group, self.device, dist.ReduceOp.MAX)

    @torch.no_grad()
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[P, *tensor.shape]``, in rank order."""
        local = tensor.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.shard.group))]
        dist.all_gather(parts, local, group=self.shard.group)
        return torch.stack(parts).to(tensor.device)


@torch.no_grad()
def global_topk(z: torch.Tensor, k: int, shard: VocabShard, comm: _Collectives):
    """(values, global indices) ``[n, k]`` of the k best entries of each full row, best first, from
    this rank's shard ``z`` (see ``merge_candidates``); and this rank's best (value, local index) ``[n]``."""
    index = select_topk(z, min(k, shard.size))
    values = z.gather(1, index)
    return (*merge_candidates(values, index, k, shard, comm), (values[:, 0].clone(), index[:, 0].clone()))


@torch.no_grad()
def merge_candidates(values: torch.Tensor, index: torch.Tensor, k: int, shard: VocabShard, comm: _Collectives,
                     missing: torch.Tensor | None = None):
    """(values, global indices) ``[n, k]`` of the k best entries of each full row, best first: each
    rank's own best (``values`` at the local ``index``, ``[n, min(k, V_r)]`` in any order), gathered
    and ordered by value, the lower global index first among equal values (padding sorts last:
    value -inf at index V; so does a candidate ``missing`` marks)."""
    n, local_k = index.shape
    padded_values = torch.full((n, k), float("-inf"), dtype=values.dtype, device=values.device)
    where = torch.full((n, k), shard.vocab, dtype=torch.long, device=values.device)
    padded_values[:, :local_k] = values
    where[:, :local_k] = index + shard.start
    if missing is not None:
        padded_values[:, :local_k].masked_fill_(missing, float("-inf"))
        where[:, :local_k].masked_fill_(missing, shard.vocab)
    width = dist.get_world_size(shard.group) * k
    all_values = comm.gather(padded_values).permute(1, 0, 2).reshape(n, width)
    all_where = comm.gather(where).permute(1, 0, 2).reshape(n, width)
    by_index = torch.sort(all_where, dim=1, stable=True).indices
    all_values, all_where = all_values.gather(1, by_index), all_where.gather(1, by_index)
    by_value = torch.sort(all_values, dim=1, descending=True, stable=True).indices[:, :k]
    return all_values.gather(1, by_value), all_where.gather(1, by_value)


@compiler_marks.disable  # the collectives and the kernels' Functions run eagerly: a graph break under torch.compile
def vocab_parallel_rows(logits: torch.Tensor, labels: torch.Tensor, embedding: torch.Tensor, options: LossOptions,
                        shard: VocabShard, ops=None):
    """``(ce, cos, correct, lse)`` per position, as ``reference_rows`` gives them for the whole
    vocabulary, from this rank's ``logits [N, V_r]`` and ``embedding [V_r, H]`` (the same on
    every rank); differentiable in both for one backward. ``ops``: a kernel backend (the
    protocol of ``protocol.py``) for the passes over the shard's logits, or None for the
    reference's formulation throughout."""
    with autocast_off(logits.device):
        if ops is None:
            return _rows(logits, labels, embedding, options, shard)
        return _kernel_rows(logits, labels, embedding, options, shard, ops)


def _rows(logits, labels, embedding, options: LossOptions, shard: VocabShard):
    comm = _Collectives(shard, logits.device)
    dtype = compute_dtype(logits.dtype)
    n = logits.shape[0]
    rows = (labels != options.ignore_index).nonzero().squeeze(1)
    z = transformed_logits(logits.index_select(0, rows).to(dtype), options)
    y = labels.index_select(0, rows).long()

    row_max = comm.max(z.detach().amax(dim=-1))
    m = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    shifted = z - m[:, None]
    log_sum = comm.sum(shifted.exp().sum(dim=-1)).log()
    owner = shard.owns(y)
    local_y = (y - shard.start).clamp(0, shard.size - 1)
    target = comm.sum(torch.where(owner, shifted.gather(1, local_y[:, None]).squeeze(1), shifted.new_zeros(())))
    if options.label_smoothing:
        mean_shifted = comm.sum(shifted.sum(dim=-1)) / shard.vocab
        ce = log_sum - (1.0 - options.label_smoothing) * target - options.label_smoothing * mean_shifted
    else:
        ce = log_sum - target
    lse = log_sum + m

    dense = options.with_cos and options.k >= shard.vocab
    best_values, best_index, _ = global_topk(z.detach(), options.k if options.with_cos and not dense else 1, shard,
                                             comm)
    correct = best_index[:, 0] == y
    if options.with_cos:
        table = embedding.to(dtype)
        top = row_max if dense else best_values[:, 0]  # the row's maximum, unshifted (NaN / -inf as the reference)
        mu = _expected_embedding(z, table, top, best_index, dense, options.temperature, shard, comm)
        e = comm.sum(torch.where(owner[:, None], table.index_select(0, local_y), table.new_zeros(())))
        cos = cosine(mu, e)
    else:
        cos = torch.zeros_like(ce)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(n).index_copy(0, rows, values)

    return scatter(ce), scatter(cos), scatter(correct), scatter(lse)


class _ShardPasses(torch.autograd.Function):
    """The passes over a shard's ``[N, V_r]`` logits by a kernel backend, with its statistics known:
    per row the shift m_r (the shard's maximum of z', 0 where infinite) and ``log_sum = log sum
    exp(z' - m_r)``, from the kernel's forward, whose ``saved`` state (cross-entropy only, for
    ``kernel_labels``) the backward takes. Outputs, differentiable in the logits: ``log_sum``, and,
    read at a few entries, ``z'_y - m_r`` of the target (its owner's; 0 elsewhere) and z' of the
    rank's members of S (0 at the others); m_r is not differentiated, as the reference detaches its
    maximum. The backward writes the gradient of ``log_sum`` with the kernel's backward (one pass)
    and adds the few entries' gradients in place: no other ``[N, V_r]`` tensor is made."""

    @staticmethod
    def forward(ctx, logits, target_index, kernel_labels, embedding, shift, log_sum, owner, member_index, member,
                saved, ops, options: LossOptions):
        label_value = _entries(logits, target_index[:, None], owner[:, None], options)[0].squeeze(1)
        target = torch.where(owner, label_value - shift, label_value.new_zeros(()))
        members = _entries(logits, member_index, member, options)[0]
        ctx.save_for_backward(logits, target_index, kernel_labels, embedding, owner, member_index, member, shift,
                              log_sum, *saved)
        ctx.ops, ctx.options = ops, options
        return log_sum.clone(), target, members

    @staticmethod
    def backward(ctx, grad_log_sum, grad_target, grad_members):
        if torch.is_grad_enabled():
            raise UnsupportedDifferentiationError(NO_HIGHER_ORDER)
        (logits, target_index, kernel_labels, embedding, owner, member_index, member, shift, log_sum,
         *saved) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 12
        n = logits.shape[0]
        if grad_log_sum is not None:
            zeros = torch.zeros(n, device=logits.device, dtype=torch.float32)
            dlogits, _ = ctx.ops.backward_rows(
                logits, kernel_labels, embedding, tuple(saved), zeros, zeros, _ce_only(ctx.options),
                need_logits_grad=True, need_embedding_grad=False, grad_lse=grad_log_sum.float().contiguous())
            # a row whose shard is -inf everywhere (the row's mass lies on other ranks): the kernel's
            # softmax of the shard is 0/0 there, the row's true gradient 0 (but for its entries, below)
            empty = torch.isneginf(log_sum)
            if bool(empty.any()):
                dlogits[empty] = 0
        else:
            dlogits = torch.zeros_like(logits)
        _add_entry_gradients(dlogits, logits, shift, log_sum, grad_log_sum, ctx.options,
                             [(target_index[:, None], owner[:, None], grad_target), (member_index, member, grad_members)])
        return (dlogits,) + (None,) * 11


def _ce_only(options: LossOptions) -> LossOptions:
    """The options of a kernel pass for the log-sum-exp alone (no cosine term, no smoothing)."""
    return dataclasses.replace(options, k=1, with_cos=False, label_smoothing=0.0)


def _add_entry_gradients(dlogits, logits, shift, log_sum, grad_log_sum, options: LossOptions, entries) -> None:
    """Add the gradients of a few entries (``(index [N, k], mask, grad)`` each) to the kernel's
    ``dlogits``, rounding each touched element once: its value is recomputed in float32 (the
    log-sum-exp's part ``grad * exp((z' - m_r) - log_sum) * dz'/dz`` plus every entry gradient at
    that element) and written over the kernel's, so a 16-bit gradient is not rounded twice."""
    rows, cols, grads = [], [], []
    for index, mask, grad in entries:
        if grad is None or not bool(mask.any()):
            continue
        grad = grad if grad.dim() == 2 else grad[:, None]
        where = mask.nonzero(as_tuple=True)
        rows.append(where[0])
        cols.append(index[where])
        grads.append(grad.expand_as(index)[where].float())
    if not rows:
        return
    vocab = logits.shape[1]
    keys, inverse = torch.unique(torch.cat(rows) * vocab + torch.cat(cols), return_inverse=True)
    total = torch.zeros(keys.shape[0], device=logits.device, dtype=torch.float32).index_add_(0, inverse,
                                                                                              torch.cat(grads))
    row, col = keys // vocab, keys % vocab
    value, slope = _transformed_with_slope(logits[row, col].float(), options)
    total = total * slope
    if grad_log_sum is not None:
        share = torch.where(torch.isneginf(log_sum[row]), log_sum.new_zeros(()),
                            torch.exp((value - shift[row]) - log_sum[row]))
        total = total + grad_log_sum.float()[row] * share * slope
    dlogits[row, col] = total.to(dlogits.dtype)


def _entries(logits, index, mask, options: LossOptions):
    """(z', dz'/dz) of ``logits`` at ``index`` ``[N, k]`` in float32, 0 and 0 where ``mask`` is False."""
    value, slope = _transformed_with_slope(logits.gather(1, index).float(), options)
    zero = value.new_zeros(())
    return torch.where(mask, value, zero), torch.where(mask, slope, zero)


def _transformed_with_slope(z: torch.Tensor, options: LossOptions):
    """(z', dz'/dz) of float32 values ``z``, the slope by autograd of the reference's own transform."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_()
        value = transformed_logits(leaf, options)
        (slope,) = torch.autograd.grad(value.sum(), leaf) if value.requires_grad else (torch.ones_like(z),)
    return value.detach(), slope


def _kernel_rows(logits, labels, embedding, options: LossOptions, shard: VocabShard, ops):
    """``_rows`` with the passes over the shard's logits done by the kernel backend ``ops``: every
    position goes through (an ignored one with zeros), so the logits are never copied. Every term
    is formed relative to the row's maximum M (the largest of the ranks' m_r), as the reference's."""
    comm = _Collectives(shard, logits.device)
    logits, labels, embedding = kernel_layouts(logits, labels, embedding)
    valid = labels != options.ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    owner = shard.owns(y) & valid
    local_y = (y - shard.start).clamp(0, shard.size - 1)

    dense = options.with_cos and options.k >= shard.vocab
    k = options.k if options.with_cos and not dense else 1
    local_k = min(k, shard.size)
    kernel_labels = torch.where(valid, local_y, torch.full_like(local_y, options.ignore_index))
    pieces = ops.shard_rows(logits, kernel_labels, options, local_k) if hasattr(ops, "shard_rows") else None
    if pieces is not None:  # the statistics and the candidates from the kernel's one pass
        shift, log_sum_here, saved = pieces.row_max, pieces.log_sum, pieces.saved
        missing = (pieces.candidates < 0) | ~valid[:, None]  # (an ignored row's candidates are not used)
        candidates = pieces.candidates.clamp_min(0)
        candidate_values = _entries(logits, candidates, ~missing, options)[0]
        best_values, best_index = merge_candidates(candidate_values, candidates, k, shard, comm, missing)
    else:  # the candidates by torch.topk on z'; the kernel's ce for the shard's argmax is its log_sum
        with torch.no_grad():  # (ce = log_sum - (z'_argmax - m_r), and z'_argmax = m_r)
            keys = transformed_logits(logits.float(), options) if _transforms(options) else logits
            best_values, best_index, (peak, anchor) = global_topk(keys, k, shard, comm)
            del keys
        kernel_labels = torch.where(valid, anchor, torch.full_like(anchor, options.ignore_index))
        ce_here, _, _, _, saved = ops.forward_rows(logits, kernel_labels, embedding, _ce_only(options))
        peak = peak.float()
        shift = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
        log_sum_here = torch.where(torch.isneginf(peak), peak, ce_here)
    correct = (best_index[:, 0] == y) & valid
    if options.with_cos and not dense:
        member = shard.owns(best_index) & valid[:, None]
        member_index = (best_index - shard.start).clamp(0, shard.size - 1)
    else:
        member_index = best_index[:, :0]
        member = member_index.bool()
    log_sum_here, target_here, member_z = _ShardPasses.apply(
        logits, local_y, kernel_labels, embedding, shift, log_sum_here, owner, member_index, member, tuple(saved), ops,
        options)

    zero = log_sum_here.new_zeros(())
    empty = torch.isneginf(log_sum_here.detach()) | ~valid
    row_max = comm.max(torch.where(empty, shift.new_full((), float("-inf")), shift))
    m = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    offset = shift - m  # m_r - M, exact
    log_sum = comm.sum(torch.where(empty, zero, torch.exp(offset + log_sum_here))).log()
    target = comm.sum(torch.where(owner, target_here + offset, zero))  # z'_y - M
    if options.label_smoothing:
        mean = comm.sum((transformed_logits(logits.float(), options) - m[:, None]).sum(dim=-1)) / shard.vocab
        ce = log_sum - (1.0 - options.label_smoothing) * target - options.label_smoothing * mean
    else:
        ce = log_sum - target
    lse = log_sum + m
    if options.with_cos:
        table = embedding.float()
        # an ignored row's terms are zeros, and nothing infinite or NaN may meet them (its gradient would be NaN)
        peak = torch.where(valid, best_values[:, 0].float(), 0.0)
        if dense:
            z = torch.where(valid[:, None], transformed_logits(logits.float(), options), 0.0)
            numerators = torch.exp((z - peak[:, None]) / options.temperature)
            numerators = torch.where(valid[:, None], numerators, numerators.new_zeros(()))
            mu = _mean_over_s(numerators, table, None, comm, valid)
        else:
            numerators = torch.where(member & valid[:, None], torch.exp((member_z - peak[:, None]) / options.temperature),
                                     member_z.new_zeros(()))
            mu = _mean_over_s(numerators, table, member_index, comm, valid)
        e = comm.sum(torch.where(owner[:, None], table.index_select(0, local_y), table.new_zeros(())))
        cos = torch.where(valid, cosine(mu, e), mu.new_zeros(()))
    else:
        cos = torch.zeros_like(ce)
    return torch.where(valid, ce, zero), cos, correct, torch.where(valid, lse, zero)


def _transforms(options: LossOptions) -> bool:
    return options.logit_scale != 1.0 or options.softcap is not None


def _expected_embedding(z, table, top, best_index, dense, temperature, shard: VocabShard, comm: _Collectives):
    """mu = sum_{i in S} w_i E[i], w_i = exp((z_i - top) / T) / sum_{j in S} exp((z_j - top) / T), each sum
    over the ranks' members of S."""
    if dense:
        return _mean_over_s(torch.exp((z - top[:, None]) / temperature), table, None, comm)
    member = shard.owns(best_index)
    local = (best_index - shard.start).clamp(0, shard.size - 1)
    numerators = torch.where(member, torch.exp((z.gather(1, local) - top[:, None]) / temperature), z.new_zeros(()))
    return _mean_over_s(numerators, table, local, comm)


def _mean_over_s(numerators, table, index, comm: _Collectives, valid=None):
    """mu from this rank's softmax numerators over its members of S (at ``index`` ``[n, k]`` of
    ``table``, or every row of it for None): the weights w_i = numerator_i / (their sum over every
    rank) are formed first and mu summed from them, so that the gradient's s-bar is made of the very
    rounded s_j it is subtracted from (docs/spec.md, "Numerics"; a sum of E[i] times the numerators,
    divided afterwards, leaves a rounding that 1 / T amplifies)."""
    denominator = comm.sum_for_local_use(numerators.sum(dim=-1))
    if valid is not None:
        denominator = torch.where(valid, denominator, torch.ones_like(denominator))
    weights = numerators / denominator[:, None]
    partial = Float32MatMul.apply(weights, table) if index is None else WeightedRowSum.apply(index, table, weights)
    return comm.sum(partial)


__all__ = ["VocabShard", "check_process_group", "copy_to_shards", "resolve_shard", "vocab_parallel_rows"]
