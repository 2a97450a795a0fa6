"""Teacher–student distillation of a fast face embedder from a dlib-family teacher.

The student is a slim member of dlib's ResNet family (fewer residual blocks, smaller
input: :func:`student_arch`), initialised from the teacher's own layers (stem, the first
block of each level, fc), and trained to mimic the teacher on *every* available face:

* labelled development people (LFW DevTrain people with ≥ 2 photos, minus the
  benchmark's held-out people and minus a people-disjoint early-stop split), and
* unlabelled faces (LFW people with one photo, faces cut from other photos and video
  frames), which need no labels because the teacher supplies the targets.

Each step draws a batch (``MPerClassSampler`` on the labelled part + random unlabelled
faces), applies fresh random augmentations (flip, scale, shift, rotation, colour,
greyscale) to the 150-px teacher chips, computes the teacher's embeddings of exactly those
views on the fly, and trains the student on the same views downscaled to its input size
with

``w_reg · (1 − cos(student, teacher))``  (embedding regression)
``+ w_kl · KL(p_teacher ‖ p_student)``  (row-wise softmax over the batch's cosine
similarities at temperature ``tau``, self-pairs excluded: the teacher's similarity
structure)
``+ w_metric · multi-similarity loss`` on the labelled rows' identities.

The student keeps the teacher's 150-px ``dlib-chip-5pt`` geometry: its checkpoint says
``align_size`` 150 and ``crop_size`` (e.g. 112), so at run time faces are warped exactly
as for the teacher and area-resized.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from facepipe.train.embedder_data import is_heldout, load_aligned, verification_metrics

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

VERSION = "1.0"

#: Student layouts (blocks in forward order, (filters, downsample)); widths match the teacher's
#: so every student layer can start from a teacher layer.
STUDENTS: dict[str, list[list[Any]]] = {
    "slim-5": [[32, False], [64, True], [128, True], [256, True], [256, True]],
    "slim-4": [[64, True], [128, True], [256, True], [256, True]],
    "slim-8": [[32, False], [32, False], [64, True], [64, False], [128, True], [128, False], [256, True],
               [256, True]],
}


def student_arch(layout: str, seed: int = 0) -> dict[str, Any]:
    """``arch`` record of a named student layout (dlib family, 128-d dlib-style fc head)."""
    if layout not in STUDENTS:
        raise ValueError(f"unknown student layout {layout!r}; valid: {', '.join(STUDENTS)}")
    return {"backbone": "dlib_resnet", "stem": 32, "blocks": STUDENTS[layout], "dim": 128, "head": None,
            "init_seed": seed, "layout": layout}


def init_from_teacher(student: "torch.nn.Module", teacher: "torch.nn.Module") -> list[tuple[int, int]]:
    """Copy the stem, fc and, for each student block, the first unused teacher block of the same
    (width, downsampling) in forward order. Returns the (student, teacher) block pairs used."""
    student.stem.load_state_dict(teacher.stem.state_dict())
    student.fc.load_state_dict(teacher.fc.state_dict())
    pairs, j = [], 0
    tspec = teacher.blocks_spec
    for i, spec in enumerate(student.blocks_spec):
        while j < len(tspec) and tspec[j] != spec:
            j += 1
        if j == len(tspec):
            raise ValueError(f"student block {i} {spec} has no teacher counterpart")
        student.blocks[i].load_state_dict(teacher.blocks[j].state_dict())
        pairs.append((i, j))
        j += 1
    return pairs


@dataclass
class DistillConfig:
    """Everything that determines a distillation run (recorded in the checkpoint)."""

    labelled: list[str]
    unlabelled: list[str] = field(default_factory=list)
    teacher: str = "dlib-port"
    layout: str = "slim-5"
    input_size: int = 112
    init_from_teacher: bool = True
    steps: int = 3000
    batch_labelled: int = 48
    m_per_class: int = 4
    batch_unlabelled: int = 48
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    w_reg: float = 1.0
    w_kl: float = 1.0
    tau: float = 0.1
    w_metric: float = 0.2
    val_fraction: float = 0.15
    val_seed: int = 1
    eval_every: int = 250
    patience: int = 6
    select_metric: str = "auc"
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    name: str = "facepipe-dlib-student"
    registry_name: str | None = None


def _kl_batch(s: "torch.Tensor", t: "torch.Tensor", tau: float) -> "torch.Tensor":
    """KL(p_t ‖ p_s) of row-wise softmaxes over in-batch cosine similarities (diagonal excluded)."""
    import torch
    import torch.nn.functional as F

    n = s.shape[0]
    mask = torch.eye(n, dtype=torch.bool, device=s.device)
    ls = (s @ s.T / tau).masked_fill(mask, -1e4)
    lt = (t @ t.T / tau).masked_fill(mask, -1e4)
    return F.kl_div(F.log_softmax(ls, 1), F.log_softmax(lt, 1), log_target=True, reduction="batchmean")


def train_student(cfg: DistillConfig, out: str | Path,
                  progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Distil, select on the early-stop people (student without flip TTA), write the checkpoint."""
    import torch
    import torch.nn.functional as F

    from facepipe.device import resolve_device
    from facepipe.embed import checkpoint_dict
    from facepipe.embed.dlib_resnet import fuse_affines
    from facepipe.embed.network import build_network, make_checkpoint, save_checkpoint
    from facepipe.train.embedder import augment
    from facepipe.train.embedder_dlib import _batches, _metric_rows, _schedule, _to01, dlib_input, load_dev_data
    from facepipe.train.embedder_dlib import embed_crops, make_loss_for

    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    dev = load_dev_data(cfg.labelled, cfg.val_fraction, cfg.val_seed, cfg.seed)
    metric_idx, y = _metric_rows(dev.train)
    val_people = set(dev.val.labels.tolist())
    pool_parts, pool_summary = [], {}
    for p in cfg.unlabelled:
        u = load_aligned([p])
        keep = np.array([not is_heldout(x) and x not in val_people for x in u.labels])
        pool_parts.append(u.crops[keep])
        pool_summary[str(p)] = {"faces": int(keep.sum()), "dropped_heldout_or_early_stop": int((~keep).sum())}
    # labelled training photos of people with one photo left (after splits) join the pool too
    single = np.setdiff1d(np.arange(len(dev.train)), metric_idx)
    pool_parts.append(dev.train.crops[single])
    pool = np.concatenate(pool_parts) if pool_parts else np.zeros((0, 150, 150, 3), np.uint8)
    if pool.shape[1] != 150 or dev.train.crops.shape[1] != 150:
        raise ValueError("distillation needs 150-px dlib-chip-5pt caches")

    tck = checkpoint_dict(cfg.teacher)
    teacher = build_network(tck["arch"])
    teacher.load_state_dict({k: v.float() for k, v in tck["state_dict"].items()})
    if tck["arch"].get("backbone") != "dlib_resnet" or tck["preprocess"].get("alignment") != "dlib-chip-5pt":
        raise ValueError(f"teacher {cfg.teacher} is not a dlib-family embedder")
    arch = student_arch(cfg.layout, cfg.seed)
    student = build_network(arch)
    init_pairs = init_from_teacher(student, teacher) if cfg.init_from_teacher else []
    teacher_fast = fuse_affines(teacher).to(device)
    student = student.to(device)
    if device.type == "cpu":
        teacher_fast = teacher_fast.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    pixel_mean = tck["preprocess"]["pixel_mean"]
    mean = torch.tensor(pixel_mean, device=device).view(1, 3, 1, 1)
    metric_loss, miner = make_loss_for("multisimilarity")
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg.warmup_steps, cfg.steps))
    batches = _batches(y, cfg.batch_labelled, cfg.m_per_class)
    amp = device.type == "cuda"
    size = int(cfg.input_size)

    def student_input(x01: "torch.Tensor") -> "torch.Tensor":
        if x01.shape[-1] != size:
            x01 = F.interpolate(x01, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = dlib_input(x01, mean)
        return x.contiguous(memory_format=torch.channels_last) if device.type == "cpu" else x

    def val_crops() -> np.ndarray:
        import cv2

        return np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in dev.val.crops]) \
            if size != 150 else dev.val.crops

    vcrops = val_crops()
    history: list[dict[str, Any]] = []
    t0 = time.time()

    def evaluate(step: int) -> dict[str, Any]:
        m = {"step": step, "seconds": round(time.time() - t0, 1),
             "plain": verification_metrics(embed_crops(student, vcrops, mean, device), dev.pairs)}
        history.append(m)
        log.info("step %d early-stop val: acc %.4f auc %.5f tar@1e-3 %.3f %.0fs", step, m["plain"]["accuracy"],
                 m["plain"]["auc"], m["plain"]["tar@far=0.001"], m["seconds"])
        return m

    log.info("distil %s -> %s (%d px, init from teacher blocks %s): %d labelled training photos, "
             "pool of %d unlabelled faces, %d early-stop pairs", cfg.teacher, cfg.layout, size,
             [j for _, j in init_pairs], len(metric_idx), len(pool), len(dev.pairs))
    best, best_m, bad = copy.deepcopy(student.state_dict()), evaluate(0), 0
    parts_log: list[dict[str, float]] = []
    for step in range(1, cfg.steps + 1):
        bidx = next(batches)
        uidx = rng.integers(0, len(pool), cfg.batch_unlabelled) if len(pool) and cfg.batch_unlabelled else []
        crops = np.concatenate([dev.train.crops[metric_idx[bidx]]] + ([pool[np.sort(uidx)]] if len(uidx) else []))
        x01 = augment(_to01(crops, device), 150, gen)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            xt = dlib_input(x01, mean)
            if device.type == "cpu":
                xt = xt.contiguous(memory_format=torch.channels_last)
            t = F.normalize(teacher_fast.forward_unnormalised(xt).float(), dim=1)
        t = t.clone()
        student.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            s = F.normalize(student.forward_unnormalised(student_input(x01)).float(), dim=1)
        l_reg = (1.0 - (s * t).sum(1)).mean()
        l_kl = _kl_batch(s, t, cfg.tau)
        nl = len(bidx)
        yy = torch.from_numpy(y[bidx]).to(device)
        l_metric = metric_loss(s[:nl], yy, miner(s[:nl], yy))
        loss = cfg.w_reg * l_reg + cfg.w_kl * l_kl + cfg.w_metric * l_metric
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        parts = {"loss": float(loss.detach()), "reg": float(l_reg.detach()), "kl": float(l_kl.detach()),
                 "metric": float(l_metric.detach())}
        parts_log.append(parts)
        if progress is not None:
            progress(step, parts)
        if step % 10 == 0:
            mean_parts = {k: round(float(np.mean([p[k] for p in parts_log[-10:]])), 4) for k in parts}
            log.info("step %d/%d %s %.0fs", step, cfg.steps, mean_parts, time.time() - t0)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            m = evaluate(step)
            m["train"] = {k: float(np.mean([p[k] for p in parts_log[-cfg.eval_every:]])) for k in parts}
            if m["plain"][cfg.select_metric] > best_m["plain"][cfg.select_metric]:
                best, best_m, bad = copy.deepcopy(student.state_dict()), m, 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    log.info("early stop at step %d (best step %d)", step, best_m["step"])
                    break
    train_seconds = time.time() - t0
    student.load_state_dict(best)
    student = student.cpu().float().to(memory_format=torch.contiguous_format)
    pre = dict(tck["preprocess"], crop_size=size, align_size=150, flip_tta=False)
    training = {"regime": "distillation", "loss": f"{cfg.w_reg}*(1-cos) + {cfg.w_kl}*KL(tau={cfg.tau}) + "
                                                  f"{cfg.w_metric}*multisimilarity",
                "config": asdict(cfg), "teacher": {"spec": cfg.teacher, "name": tck.get("name"),
                                                   "registry_name": tck.get("registry_name")},
                "init_from_teacher_blocks": init_pairs, "data_summary": dict(dev.summary, unlabelled=pool_summary,
                                                                              pool_faces=int(len(pool))),
                "train_seconds": round(train_seconds, 1), "device": str(device),
                "amp": "bf16" if amp else "fp32", "best_step": best_m["step"],
                "early_stop_metrics": best_m, "history": history}
    tprov = tck.get("provenance") or {}
    provenance = {"teacher": f"{tck.get('name')} ({tprov.get('weights') or tprov.get('initialisation') or ''})",
                  "student": f"{cfg.layout} dlib-family ResNet"
                             + (", initialised from the teacher's layers" if init_pairs else "")
                             + ", distilled by facepipe on LFW DevTrain development faces and unlabelled faces"}
    ck = make_checkpoint(student, name=cfg.name, version=VERSION, arch=arch, preprocess=pre, training=training,
                         registry_name=cfg.registry_name, provenance=provenance)
    save_checkpoint(ck, out)
    return {"checkpoint": str(out), "best": best_m, "history": history, "train_seconds": train_seconds}
