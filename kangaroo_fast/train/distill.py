"""Distil a Kangaroo adapter: it reads the layer-``exit_layer`` hidden states and learns the full model's
next-token distribution with soft cross-entropy; the LM head stays frozen (paper, section 3).

With a draft vocabulary, the loss is taken over those tokens only (the teacher's distribution renormalised over
them), since the draft head scores nothing else. Multi-process training runs through torch.distributed (DDP);
launch it with ``torchrun``: each rank takes every world-size-th sequence, rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapter import Adapter, AdapterConfig
from ..backend.torch_ref import top1
from ..config import ModelConfig, is_int, is_number
from .data import Features


class TimeLimit(Exception):
    """A training run reached its time limit at a save point: everything made so far is saved, and the same
    command resumes from there (``run_recipe(time_limit=...)``, ``kangaroo-fast train --time-limit``)."""


@dataclass
class Recipe:
    """Everything that decides the shipped adapter; stored as JSON beside it."""
    exit_layer: int = 2
    candidate_exit_layers: list[int] = field(default_factory=lambda: [2])
    n_instructions: int = 800
    n_bootstrap: int = 0  # second-stage instructions built on the first stage's answers (bootstrap_instructions)
    n_sampled: int = 0  # requests the model writes itself (data.sample_requests), answered in stage 1 too
    instruction_seed: int = 0
    max_new_tokens: int = 160
    doc_chars: int = 150_000
    doc_chunk_tokens: int = 256
    draft_vocab_size: int = 8192
    top_k: int = 32
    epochs: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 30
    heldout_fraction: float = 0.1
    seed: int = 0
    threshold: float = 0.6
    max_draft_steps: int = 6
    lookup: int = 0  # the context lookup setting stored with the adapter (chosen by `kangaroo-fast tune --lookups`)
    gen_batch_size: int = 32
    teacher_batch_size: int = 8
    dtype: str = "bfloat16"
    answer_only_loss: bool = False  # count only answer positions (those drafting sees), not prompts or docs
    adapter_mlp: int = 0  # intermediate size of an MLP after the adapter's attention (0: the paper's adapter)

    @classmethod
    def load(cls, path: str | Path, _within: tuple[Path, ...] = ()) -> "Recipe":
        """The recipe a JSON file holds; malformed JSON, unknown keys and values of the wrong type are errors
        naming the file and the key. ``"base": "other.json"`` (a path relative to this file) starts from that
        recipe and overrides only the fields this file lists; the loaded recipe is whole, with no ``base``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"recipe {str(path)!r} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"recipe {str(path)!r} must hold a JSON object, not {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__) - {"base"}
        if unknown:
            raise ValueError(f"recipe {str(path)!r} has unknown keys: {', '.join(sorted(unknown))}")
        defaults = asdict(cls())
        values = defaults
        if "base" in data:
            base = data.pop("base")
            if not isinstance(base, str) or not base:
                raise ValueError(f"recipe {str(path)!r}: base={base!r} must be the path of another recipe file")
            base_path = path.parent / base
            within = _within + (path.resolve(),)
            if base_path.resolve() in within:
                raise ValueError(f"recipe {str(path)!r}: base={base!r} leads back to "
                                 f"{str(base_path)!r} (a cycle of bases)")
            if not base_path.is_file():
                raise FileNotFoundError(f"recipe {str(path)!r}: base={base!r} is not a file "
                                        f"({str(base_path)!r})")
            values = asdict(cls.load(base_path, within))
        for key, value in data.items():
            if not _same_kind(value, defaults[key]):
                raise ValueError(f"recipe {str(path)!r}: {key}={value!r} must be of the kind of its default "
                                 f"{defaults[key]!r}")
        values = {**values, **data}
        for key, zero in (("adapter_mlp", "no MLP"), ("n_sampled", "none")):
            if values[key] < 0:
                raise ValueError(f"recipe {str(path)!r}: {key}={values[key]!r} must be >= 0 (0: {zero})")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())


def _same_kind(value, default) -> bool:
    """Whether a recipe value has its default's kind: bool, int (not bool), number, string or list of ints."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return is_int(value)
    if isinstance(default, float):
        return is_number(value)
    if isinstance(default, list):
        return isinstance(value, list) and all(is_int(v) for v in value)
    return isinstance(value, type(default))


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def init_adapter(model_config: ModelConfig, final_norm: torch.Tensor, draft_vocab: torch.Tensor | None,
                 exit_layer: int, seed: int, mlp_size: int = 0) -> Adapter:
    """Small random q/k/v (and MLP gate/up), zero o_proj (and MLP down): the adapter starts as the identity;
    final norm = the model's."""
    torch.manual_seed(seed)
    adapter = Adapter(AdapterConfig.for_model(model_config, exit_layer=exit_layer, mlp_size=mlp_size), draft_vocab)
    with torch.no_grad():
        for proj in (adapter.q_proj, adapter.k_proj, adapter.v_proj):
            proj.weight.normal_(0.0, 0.02)
        adapter.o_proj.weight.zero_()
        if mlp_size:
            adapter.gate_proj.weight.normal_(0.0, 0.02)
            adapter.up_proj.weight.normal_(0.0, 0.02)
            adapter.down_proj.weight.zero_()
        adapter.norm.copy_(final_norm.float())
    return adapter


def _targets(top_ids: torch.Tensor, top_probs: torch.Tensor, lookup: torch.Tensor, width: int) -> torch.Tensor:
    """Teacher top-k [T, k] -> dense distribution over the draft vocabulary [T, width], renormalised."""
    index = lookup[top_ids.long()]
    probs = top_probs.float() * (index >= 0)
    dense = torch.zeros(top_ids.shape[0], width)
    dense.scatter_add_(1, index.clamp(min=0), probs)
    return dense / dense.sum(-1, keepdim=True).clamp(min=1e-6)


def _batch(features: Features, exit_layer: int, indices: list[int], lookup: torch.Tensor, width: int,
           loss_from: list[int] | None = None):
    seqs = [features.hidden[exit_layer][i] for i in indices]
    t = max(s.shape[0] for s in seqs)
    hidden = torch.zeros(len(seqs), t, seqs[0].shape[1])
    target = torch.zeros(len(seqs), t, width)
    mask = torch.zeros(len(seqs), t)
    for row, i in enumerate(indices):
        n = seqs[row].shape[0]
        hidden[row, :n] = seqs[row].float()
        target[row, :n] = _targets(features.top_ids[i], features.top_probs[i], lookup, width)
        first = 0 if loss_from is None else loss_from[i]
        if first >= 0:
            mask[row, max(first - 1, 0):n] = 1.0  # position start-1 predicts the answer's first token
    return hidden, target, mask


def _loss(adapter, hidden, target, mask, head, cos, sin):
    t = hidden.shape[1]
    logits = F.linear(adapter(hidden, cos[:t], sin[:t]), head)
    per_token = -(target * logits.log_softmax(-1)).sum(-1)
    agree = (logits.argmax(-1) == target.argmax(-1)).float()
    return (per_token * mask).sum() / mask.sum(), (agree * mask).sum() / mask.sum()


def train_adapter(adapter: Adapter, features: Features, train_idx: list[int], heldout_idx: list[int],
                  lm_head: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, recipe: Recipe,
                  checkpoint: Path | None = None, resume: bool = False, progress: bool = True,
                  log: list | None = None, stop_after: int | None = None,
                  loss_from: list[int] | None = None, checkpoint_key: dict | None = None,
                  should_stop=None) -> Adapter:
    """Soft cross-entropy distillation; returns the trained adapter (the module, unwrapped from DDP).

    ``loss_from[i]`` (with ``recipe.answer_only_loss``) is where sequence i's answer starts; -1 leaves a sequence
    out of the loss. ``checkpoint`` is written after every epoch, with ``checkpoint_key`` (what produced it: the
    recipe, the base model); with ``resume`` training continues from it when its key is the same, and starts afresh
    (saying which field differs) otherwise. ``stop_after`` ends this run after that many epochs in all (a time-boxed
    run), leaving the rest to a resumed one. ``should_stop()``, asked after each epoch's checkpoint (rank 0
    decides for every rank), raises ``TimeLimit`` when it says so and epochs are left. ``log`` gets one entry per
    epoch, the resumed checkpoint's earlier ones included, each with the seconds the epoch took.
    """
    exit_layer = adapter.config.exit_layer
    loss_from = loss_from if recipe.answer_only_loss else None
    if loss_from is not None:
        train_idx = [i for i in train_idx if loss_from[i] >= 0]
    vocab = adapter.draft_vocab
    head = adapter.head_weight(lm_head).float()
    width = head.shape[0]
    lookup = torch.full((lm_head.shape[0],), -1, dtype=torch.int64)
    lookup[vocab if vocab is not None else torch.arange(width)] = torch.arange(width)
    cos, sin = cos.float(), sin.float()
    model = adapter
    world, rank = 1, 0
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        model = torch.nn.parallel.DistributedDataParallel(adapter)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_idx) / (recipe.batch_size * world))
    total = steps_per_epoch * recipe.epochs

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start_epoch = 0
    state = _matching_checkpoint(checkpoint, checkpoint_key) if resume and checkpoint is not None else None
    if state is not None:
        adapter.load_state_dict(state["adapter"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        if log is not None:
            log.extend(state.get("log", []))
    last_epoch = recipe.epochs if stop_after is None else min(stop_after, recipe.epochs)
    for epoch in range(start_epoch, last_epoch):
        began = time.monotonic()
        order = list(train_idx)
        random.Random(recipe.seed + epoch).shuffle(order)
        mine = order[rank::world]
        model.train()
        bar = tqdm(range(0, len(mine), recipe.batch_size), desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   disable=not (progress and _is_main()))
        running = 0.0
        for n, start in enumerate(bar):
            hidden, target, mask = _batch(features, exit_layer, mine[start:start + recipe.batch_size], lookup, width,
                                          loss_from)
            loss, agree = _loss(model, hidden, target, mask, head, cos, sin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            running = loss.item() if n == 0 else 0.9 * running + 0.1 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}", top1=f"{agree.item():.3f}")
        heldout = evaluate_loss(adapter, features, heldout_idx, head, lookup, cos, sin, recipe.batch_size, loss_from)
        if _is_main():
            entry = {"epoch": epoch + 1, "train_loss": running, **heldout,
                     "seconds": round(time.monotonic() - began, 3)}
            if log is not None:
                log.append(entry)
            tqdm.write(json.dumps(entry))
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                tmp = checkpoint.with_suffix(".tmp")
                torch.save({"adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "key": checkpoint_key,
                            "log": [] if log is None else log}, tmp)
                tmp.replace(checkpoint)
        if epoch + 1 < last_epoch and _agreed(should_stop is not None and should_stop()):
            raise TimeLimit(f"exit layer {exit_layer}: {epoch + 1} of {recipe.epochs} epochs trained")
    return adapter


def _agreed(flag: bool) -> bool:
    """Rank 0's ``flag``, the same on every rank (one broadcast under torch.distributed)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    dist.broadcast(value, 0)
    return bool(value.item())


def _matching_checkpoint(checkpoint: Path, key: dict | None) -> dict | None:
    """The checkpoint's state when it exists and was written with ``key``; else None (train from scratch)."""
    if not checkpoint.exists():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    differing = differing_field(state.get("key"), key)
    if differing is not None:
        tqdm.write(f"{checkpoint}: written with another {differing}; training from scratch")
        return None
    return state


def differing_field(cached: dict | None, wanted: dict | None) -> str | None:
    """None when a cache's key equals the wanted one, else the first differing field as 'name (old -> new)'."""
    if cached == wanted:
        return None
    if not isinstance(cached, dict) or not isinstance(wanted, dict):
        return f"key ({cached!r} -> {wanted!r})"
    for name in list(wanted) + [k for k in cached if k not in wanted]:
        if cached.get(name) != wanted.get(name):
            return f"{name} ({cached.get(name)!r} -> {wanted.get(name)!r})"
    return None


@torch.no_grad()
def evaluate_loss(adapter, features, indices, head, lookup, cos, sin, batch_size, loss_from=None) -> dict:
    """Held-out soft cross-entropy and top-1 agreement with the teacher (over the draft vocabulary)."""
    if not indices:
        return {}
    adapter.eval()
    total_loss = total_agree = total_tokens = 0.0
    for start in range(0, len(indices), batch_size):
        hidden, target, mask = _batch(features, adapter.config.exit_layer, indices[start:start + batch_size],
                                      lookup, head.shape[0], loss_from)
        loss, agree = _loss(adapter, hidden, target, mask, head, cos, sin)
        tokens = mask.sum().item()
        total_loss += loss.item() * tokens
        total_agree += agree.item() * tokens
        total_tokens += tokens
    adapter.train()
    return {"heldout_loss": total_loss / total_tokens, "heldout_top1": total_agree / total_tokens}


@torch.no_grad()
def draft_predictions(adapter: Adapter, features: Features, indices: list[int], lm_head: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: (draft correct? [T] bool, draft confidence [T]) at every position, teacher-forced."""
    adapter.eval()
    head = adapter.head_weight(lm_head).float()
    out = []
    for i in indices:
        hidden = features.hidden[adapter.config.exit_layer][i].float()[None]
        t = hidden.shape[1]
        index, conf = top1(F.linear(adapter(hidden, cos[:t].float(), sin[:t].float()), head)[0])
        token = index if adapter.draft_vocab is None else adapter.draft_vocab[index]
        out.append((token == features.top_ids[i][:, 0].long(), conf))
    return out


def simulate_rounds(predictions, starts: list[int], threshold: float, max_draft_steps: int,
                    cumulative: bool = False) -> dict:
    """Replay the engine's draft/accept rule along each answer (teacher-forced drafts are exactly the drafts
    the engine makes while they are correct). Returns mean tokens per round (exact) and drafts per round (exact
    for thresholds 0 and 1; otherwise an estimate, as drafts after a rejected one see the right token here).
    ``cumulative``: drafting stops once the product of the round's confidences so far falls below ``threshold``
    (the chance, were they calibrated, that every draft so far is accepted) instead of the newest one alone."""
    rounds = tokens = drafts_total = 0
    for (correct, conf), start in zip(predictions, starts):
        end = correct.shape[0]
        p = start  # the prefill emitted the answer's first token; each round's "last" token sits at p
        while p < end - 1:
            drafts = accepted = 0
            ok = True
            chance = 1.0
            # as the engine: k drafts may emit k + 1 tokens, so they stop where the answer would overrun
            while drafts < max_draft_steps and p + drafts < end - 2:
                drafts += 1
                if ok and bool(correct[p + drafts - 1]):
                    accepted += 1
                else:
                    ok = False
                chance = chance * float(conf[p + drafts - 1]) if cumulative else float(conf[p + drafts - 1])
                if chance < threshold:
                    break
            emitted = min(accepted + 1, end - 1 - p)
            rounds += 1
            tokens += emitted
            drafts_total += drafts
            p += emitted
    return {"threshold": threshold, "max_draft_steps": max_draft_steps, "cumulative": cumulative,
            "mean_accepted": tokens / max(rounds, 1), "drafts_per_round": drafts_total / max(rounds, 1)}
