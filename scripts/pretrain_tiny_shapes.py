"""Pre-train the embedded `tiny-shapes` CLIP on ShapesWorld captions (CPU, reproducible by seed).

    python scripts/pretrain_tiny_shapes.py --bf16 --threads 2 --out runs/tiny-shapes --export

The architecture is the open_clip config shipped in src/clipadapt/assets/tiny-shapes/. Scenes
and captions are generated on the fly (one DataLoader worker); the contrastive targets are
duplicate-aware: every image in the batch that satisfies a caption's facts is a positive.
`--export` writes the fp16 safetensors the package ships.

A small ViT trained on this little data sits on a plateau: it memorises but does not learn
shape for thousands of steps, while a small CNN learns shape in a few hundred (docs/tiny-shapes.md
has the measurements). So a small CNN teaches the ViT: the ViT's tokens after block
`--distill-layers` regress the CNN's stride-8 feature map (dense feature distillation, detached
targets), beside the contrastive loss. `--teacher facts` (default) first trains the CNN for
`--teacher-steps` on single-object scenes to predict their facts (shape: cross-entropy; colour,
pattern, lighting, weather, quality: multi-label, from the generator) and then freezes it;
`--teacher captions` trains it beside the ViT with the same captions and text tower;
`--teacher none` is plain CLIP.
The CNN and the regression head are training-only: `--export` writes the open_clip ViT CLIP.

What the ViT is slowest to learn is a shape at every position (docs/tiny-shapes.md). The first
`--easy-steps` are clean single objects in groups that differ only in shape; of those, the first
`--centre-steps` put the object at the image centre and the next `--spread-steps` widen its
range to the whole image (position curriculum). Afterwards `--easy-share` of the groups stay easy.

The shipped checkpoint is that run fine-tuned with `--init DIR --region-weight 1` (README): for
every scene the world's instance masks give each object's and the background's share of every
patch; the share-weighted mean of the patch features of the last block's value path
(`--region-attention`, default maskclip) meets a phrase naming the region in the same
duplicate-aware contrastive loss, so that patch features sit in the text space as real CLIP's
do (what SCLIP relies on) without training the attention that SCLIP and vanilla CLIP compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipadapt.backbones.dense import ATTENTIONS, _last_block
from clipadapt.data import shapesworld as sw
from clipadapt.data import shapesworld_text as st

ASSETS = Path(__file__).resolve().parents[1] / "src" / "clipadapt" / "assets" / "tiny-shapes"
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


class TeacherCNN(torch.nn.Module):
    """A small CNN image tower: a stride-8 feature map and a pooled vector for distillation,
    and an output layer (fact logits or an embedding for InfoNCE)."""

    def __init__(self, out_dim: int, width: int = 128):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.top = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(width, out_dim),
        )  # fmt: skip

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stride-8 map [B,C,h,w] and the pooled vector [B,C] the output layer reads."""
        fmap = self.stem(x)
        return fmap, self.top[:-1](fmap)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap, pooled = self.features(x)
        return self.top[-1](pooled), fmap


class Distiller(torch.nn.Module):
    """Teacher CNN + linear maps from the ViT's tokens (one per distilled block) and from its
    image embedding to the teacher's channels."""

    def __init__(self, out_dim: int, vit_width: int, embed_dim: int, layers=(1,), width: int = 128):
        super().__init__()
        self.teacher = TeacherCNN(out_dim, width)
        self.layers = tuple(layers)
        self.reg = torch.nn.ModuleList(torch.nn.Linear(vit_width, width) for _ in self.layers)
        self.pooled_reg = torch.nn.Linear(embed_dim, width)

    def hook(self, vit) -> dict[int, torch.Tensor]:
        """Record the tokens after each distilled block of ``vit`` into the returned dict."""
        tokens: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            vit.transformer.resblocks[layer].register_forward_hook(
                lambda _m, _i, o, i=i: tokens.__setitem__(i, o)
            )
        return tokens

    def dense_loss(self, tokens: dict[int, torch.Tensor], fmap: torch.Tensor) -> torch.Tensor:
        """Mean over the distilled blocks of the MSE between the mapped patch tokens
        [B,1+N,W] and the LayerNormed teacher map [B,C,h,w]."""
        target = fmap.detach().flatten(2).transpose(1, 2).float()
        target = F.layer_norm(target, target.shape[-1:])
        losses = [F.mse_loss(r(tokens[i][:, 1:].float()), target) for i, r in enumerate(self.reg)]
        return torch.stack(losses).mean()

    def pooled_loss(self, embedding: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """MSE between the mapped image embedding [B,D] and the pooled vector [B,C], each
        channel standardised over the batch (so that only what differs between images counts)."""
        target = pooled.detach().float()
        target = (target - target.mean(0)) / (target.std(0) + 1e-5)
        return F.mse_loss(self.pooled_reg(embedding.float()), target)


GROUP = 4
# What the scenes of a group differ in (the first object's shape, pattern or colour) and how often.
VARY = {"shape": 0.6, "pattern": 0.25, "colour": 0.15}


EASY = {"lighting": 0, "weather": 0, "quality": 0}


def easy_scene(rng: np.random.Generator, spread: float = 1.0) -> sw.Scene:
    """One large solid object in daylight, clear weather, sharp: shape is all there is to see.

    ``spread`` scales the object's offset from the image centre (0: centred, 1: anywhere).
    """
    scene = sw.sample_scene(rng, n_objects=(1, 1), pattern=0, attrs=EASY, size_range=(0.26, 0.42))
    towards_centre(scene.objects[0], spread)
    return scene


def towards_centre(obj: sw.Obj, spread: float) -> None:
    """Scale ``obj``'s offset from the image centre by ``spread`` (0: centred), in place."""
    obj.cx, obj.cy = 0.5 + spread * (obj.cx - 0.5), 0.5 + spread * (obj.cy - 0.5)


def spread_at(step: int, centre_steps: int, spread_steps: int) -> float:
    """Position curriculum: easy objects stay centred, then their range grows linearly."""
    if spread_steps <= 0:
        return 1.0 if step >= centre_steps else 0.0
    return min(1.0, max(0.0, (step - centre_steps) / spread_steps))


def contrast_group(
    rng: np.random.Generator, n: int, easy: bool = False, spread: float = 1.0
) -> list[sw.Scene]:
    """n copies of one scene that differ only in one property of the first object.

    Colour and scene attributes are easy to learn and would otherwise explain most caption
    pairs in a batch; a group forces the towers to tell shapes (and patterns) apart.
    """
    base = easy_scene(rng, spread) if easy else sw.sample_scene(rng)
    field = "shape" if easy else str(rng.choice(list(VARY), p=list(VARY.values())))
    count = {"shape": len(sw.SHAPES), "pattern": len(sw.PATTERNS), "colour": len(sw.COLOURS)}[field]
    values = rng.permutation(count)
    scenes = []
    for i in range(n):
        objects = list(base.objects)
        objects[0] = dataclasses.replace(objects[0], **{field: int(values[i % count])})
        scenes.append(dataclasses.replace(base, objects=objects))
    return scenes


BACKGROUND_FACT = st.N_FACTS  # one more fact column for the regions: "is the background"
N_REGION_FACTS = st.N_FACTS + 1


def region_targets(scene: sw.Scene, rng: np.random.Generator, size: int, grid: int):
    """The scene's regions (each visible object, then the background) for the region loss.

    Returns the regions' patch coverage [R, grid*grid] (the share of each patch they hold),
    their facts [R, N_REGION_FACTS] and one phrase per region with the facts it asserts: an
    object by its shape and/or colour, sometimes its pattern ("a photo of a striped red
    circle."); the background as "the background" or by its texture ("a photo of a grid
    background."). Regions under half a patch are left out.
    """
    inst = sw.instance_masks(scene, size)
    cell = size // grid
    cover = inst.reshape(len(inst), grid, cell, grid, cell).mean((2, 4)).reshape(len(inst), -1)
    covers, facts, phrases, asserted = [], [], [], []
    for obj, c in zip(scene.objects, cover, strict=True):
        if c.sum() < 0.5:
            continue
        f = np.zeros(N_REGION_FACTS, bool)
        f[: st.N_OBJECT_FACTS] = st.image_facts(dataclasses.replace(scene, objects=[obj]))[
            : st.N_OBJECT_FACTS
        ]
        shape = obj.shape if rng.random() < 0.85 else None
        colour = obj.colour if (shape is None or rng.random() < 0.7) else None
        pattern = obj.pattern if rng.random() < 0.15 else None
        words = [sw.COLOUR_NAMES[colour]] if colour is not None else []
        words += [sw.PATTERNS[pattern]] if pattern is not None else []
        words.append(sw.SHAPES[shape] if shape is not None else "shape")
        phrase = " ".join(words)
        covers.append(c)
        facts.append(f)
        phrases.append(f"a photo of {st._article(phrase)} {phrase}.")
        asserted.append(st.object_fact(shape, colour, pattern, None))
    bg = 1.0 - cover.sum(0)
    if bg.sum() >= 0.5:
        f = np.zeros(N_REGION_FACTS, bool)
        f[[BACKGROUND_FACT, st.texture_fact(scene.texture)]] = True
        covers.append(bg)
        facts.append(f)
        if rng.random() < 0.5:
            phrases.append(str(rng.choice(["a photo of the background.", "the background."])))
            asserted.append(BACKGROUND_FACT)
        else:
            phrases.append(f"a photo of a {sw.TEXTURES[scene.texture]} background.")
            asserted.append(st.texture_fact(scene.texture))
    return np.stack(covers), np.stack(facts), phrases, asserted


class Batches(torch.utils.data.IterableDataset):
    """Endless batches: images uint8 [B,H,W,3], tokens [B,L], image facts, caption facts."""

    def __init__(
        self,
        seed,
        batch,
        size,
        tokenizer,
        start=0,
        easy_steps=0,
        easy_share=0.0,
        spread=(0, 0),
        background=0.0,
        region_grid=0,
    ):
        self.seed, self.batch, self.size, self.tokenizer, self.start = (
            seed,
            batch,
            size,
            tokenizer,
            start,
        )
        self.easy_steps, self.easy_share = easy_steps, easy_share
        self.spread = spread  # (centre steps, spread steps) of the position curriculum
        self.background = background  # share of captions that name the background texture
        self.region_grid = region_grid  # patch grid side of the region loss (0: no regions)

    def __iter__(self):
        step = self.start
        while True:
            rng = np.random.default_rng([self.seed, step])
            share = 1.0 if step < self.easy_steps else self.easy_share
            scenes = [
                v
                for _ in range(self.batch // GROUP)
                for v in contrast_group(
                    rng, GROUP, easy=rng.random() < share, spread=spread_at(step, *self.spread)
                )
            ]
            images = np.stack([sw.render(s, self.size)[0] for s in scenes])
            caps, cap_facts = zip(
                *(st.caption(s, rng, self.background) for s in scenes), strict=True
            )
            img_f = np.stack([st.image_facts(s) for s in scenes])
            cap_f = np.zeros_like(img_f)
            for i, fs in enumerate(cap_facts):
                cap_f[i, fs] = True
            batch = (
                torch.from_numpy(images),
                self.tokenizer(list(caps)),
                torch.from_numpy(img_f),
                torch.from_numpy(cap_f),
            )
            if self.region_grid:  # its own stream: the captions stay those of the run without
                batch += self.regions(scenes, np.random.default_rng([self.seed, step, 7]))
            yield batch
            step += 1

    def regions(self, scenes, rng):
        """Region-loss tensors: coverage [R, P], owner image [R], region facts [R, F],
        tokens of the batch's distinct phrases [U, L] and their facts [U, F]."""
        covers, owners, facts, texts = [], [], [], {}
        for i, scene in enumerate(scenes):
            c, f, phrases, asserted = region_targets(scene, rng, self.size, self.region_grid)
            covers.append(c)
            owners += [i] * len(c)
            facts.append(f)
            texts.update(zip(phrases, asserted, strict=True))
        phrase_f = np.zeros((len(texts), N_REGION_FACTS), bool)
        phrase_f[np.arange(len(texts)), list(texts.values())] = True
        return (
            torch.from_numpy(np.concatenate(covers)),
            torch.tensor(owners),
            torch.from_numpy(np.concatenate(facts)),
            self.tokenizer(list(texts)),
            torch.from_numpy(phrase_f),
        )


def dense_tokens(model, last_input: torch.Tensor, attention: str) -> torch.Tensor:
    """The patch tokens [B, P, D] of ``attention``'s dense features: the last block rewritten as
    `clipadapt.backbones.dense` does, then ln_post and the projection (not normalised)."""
    visual = model.visual
    tokens = _last_block(visual.transformer.resblocks[-1], last_input, attention, visual.grid_size)
    return visual.ln_post(tokens[:, 1:]) @ visual.proj


def patch_embedding(model, last_input: torch.Tensor, attention: str) -> torch.Tensor:
    """The mean over patches of the dense features of ``attention``: an image embedding [B,D]
    that the contrastive loss can align with the captions, so that the patch tokens carry the
    text."""
    return dense_tokens(model, last_input, attention).mean(1)


def region_embedding(model, last_input, attention, cover, owner) -> torch.Tensor:
    """Each region's embedding [R, D]: the coverage-weighted mean of its image's L2-normalised
    dense features of ``attention``, normalised again."""
    feats = F.normalize(dense_tokens(model, last_input, attention).float(), dim=-1)
    pooled = torch.einsum("rp,rpd->rd", cover, feats[owner])
    return F.normalize(pooled, dim=-1)


def to_input(images: torch.Tensor) -> torch.Tensor:
    return (images.permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD


def contrastive_loss(img, txt, scale, img_facts, cap_facts):
    """Symmetric InfoNCE, multi-positive: caption i matches image j if j has all i's facts."""
    match = (cap_facts.float() @ (~img_facts).float().T) == 0  # [captions, images]
    logits = scale * txt @ img.T
    t2i = match.float() / match.sum(1, keepdim=True)
    i2t = match.T.float() / match.T.sum(1, keepdim=True)
    loss_t = -(t2i * F.log_softmax(logits, 1)).sum(1).mean()
    loss_i = -(i2t * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (loss_t + loss_i) / 2


def eval_sets(seed: int, n: int, size: int):
    """Held-out classification sets: {task: (images, labels, classnames, template)}."""
    rng = np.random.default_rng([seed, 10**6])
    out = {}
    tasks = {
        "shape": (lambda i: dict(shape=i), sw.SHAPES, "a photo of a {}."),
        "colour": (lambda i: dict(colour=i), sw.COLOUR_NAMES, "a photo of a {} object."),
    }
    for name, (kw, names, template) in tasks.items():
        labels = rng.integers(len(names), size=n)
        scenes = [sw.sample_scene(rng, n_objects=(1, 1), **kw(int(y))) for y in labels]
        out[name] = (np.stack([sw.render(s, size)[0] for s in scenes]), labels, names, template)
    pat = [f"{p} {s}" for s in sw.SHAPES for p in sw.PATTERNS]
    labels = rng.integers(len(pat), size=n)
    scenes = [
        sw.sample_scene(rng, n_objects=(1, 1), shape=int(y) // 3, pattern=int(y) % 3)
        for y in labels
    ]
    out["pattern"] = (
        np.stack([sw.render(s, size)[0] for s in scenes]),
        labels,
        pat,
        "a photo of a {}.",
    )
    for attr, values in sw.ATTRIBUTES.items():
        labels = rng.integers(len(values), size=n)
        scenes = [sw.sample_scene(rng, attrs={attr: int(y)}) for y in labels]
        out[attr] = (
            np.stack([sw.render(s, size)[0] for s in scenes]),
            labels,
            values,
            sw.ATTRIBUTE_TEMPLATES[attr],
        )
    return out


@torch.no_grad()
def evaluate(model, tokenizer, sets) -> dict[str, float]:
    model.eval()
    accs = {}
    for name, (images, labels, names, template) in sets.items():
        txt = F.normalize(model.encode_text(tokenizer([template.format(c) for c in names])), dim=-1)
        img = F.normalize(model.encode_image(to_input(torch.from_numpy(images))), dim=-1)
        accs[name] = float(((img @ txt.T).argmax(1).numpy() == labels).mean())
    model.train()
    return accs


@torch.no_grad()
def teacher_accuracy(teacher, sets, classify) -> float:
    """The CNN's accuracy on the held-out shape set; ``classify`` turns its outputs into scores."""
    teacher.eval()
    images, labels, _, _ = sets["shape"]
    scores = classify(teacher(to_input(torch.from_numpy(images)))[0])
    teacher.train()
    return float((scores.argmax(1).numpy() == labels).mean())


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, sets):
    """Scores of CNN embeddings against the shared text tower's shape prompts."""
    _, _, names, template = sets["shape"]
    txt = F.normalize(model.encode_text(tokenizer([template.format(c) for c in names])), dim=-1)
    return lambda emb: F.normalize(emb.float(), dim=-1) @ txt.T


# What the facts teacher predicts: each shape / colour / pattern present, and the scene values.
FACT_COLUMNS = (
    [st.object_fact(i, None, None, None) for i in range(len(sw.SHAPES))]
    + [st.object_fact(None, i, None, None) for i in range(len(sw.COLOUR_NAMES))]
    + [st.object_fact(None, None, i, None) for i in range(len(sw.PATTERNS))]
    + [st.scene_fact(a, i) for a, values in sw.ATTRIBUTES.items() for i in range(len(values))]
)


def teacher_batches(seed: int, batch: int, size: int):
    """Endless single-object scenes of the whole world: images, shape labels, fact targets."""
    columns = torch.tensor(FACT_COLUMNS)
    for step in itertools.count():
        rng = np.random.default_rng([seed, step])
        scenes = [sw.sample_scene(rng, n_objects=(1, 1)) for _ in range(batch)]
        images = torch.from_numpy(np.stack([sw.render(s, size)[0] for s in scenes]))
        facts = torch.from_numpy(np.stack([st.image_facts(s) for s in scenes]))[:, columns]
        yield images, torch.tensor([s.objects[0].shape for s in scenes]), facts.float()


def train_teacher(teacher, args, size, out: Path, sets) -> None:
    """Train the CNN on single-object scenes: cross-entropy on the shape, BCE on the other
    facts (colour, pattern, scene values); or load OUT/teacher.safetensors."""
    path = out / "teacher.safetensors"
    if path.exists():
        teacher.load_state_dict(load_file(path))
        return
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3, weight_decay=0.05)
    n_shapes = len(sw.SHAPES)
    t0 = time.time()
    stream = teacher_batches(args.seed + 7, args.batch, size)
    for step, (images, shapes, facts) in enumerate(stream):
        if step >= args.teacher_steps:
            break
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = teacher(to_input(images))[0]
        logits = logits.float()
        loss = F.cross_entropy(logits[:, :n_shapes], shapes) + F.binary_cross_entropy_with_logits(
            logits[:, n_shapes:], facts[:, n_shapes:]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            acc = teacher_accuracy(teacher, sets, lambda out: out[:, :n_shapes])
            print(
                f"teacher step {step + 1} loss {loss.item():.4f} shape acc {acc:.3f} "
                f"{(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
    save_file(teacher.state_dict(), path)


def param_groups(model, wd):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--out", default="runs/tiny-shapes")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    ap.add_argument("--export", action="store_true", help="write the fp16 weights into the package")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--easy-steps", type=int, default=1200, help="curriculum: clean single objects first"
    )
    ap.add_argument("--easy-share", type=float, default=0.3, help="share of easy groups afterwards")
    ap.add_argument(
        "--centre-steps", type=int, default=300, help="position curriculum: easy objects centred"
    )
    ap.add_argument(
        "--spread-steps",
        type=int,
        default=800,
        help="position curriculum: steps over which the easy objects' range grows to the image",
    )
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fp32 master weights)")
    ap.add_argument(
        "--teacher",
        choices=["facts", "captions", "none"],
        default="facts",
        help="CNN whose feature map the ViT distils: trained first on scene facts, "
        "co-trained on the captions, or none",
    )
    ap.add_argument("--teacher-steps", type=int, default=1200, help="facts: teacher steps")
    ap.add_argument(
        "--distill-layers",
        default="1",
        help="comma-separated ViT blocks whose tokens regress the teacher's stride-8 map",
    )
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument(
        "--pooled-weight",
        type=float,
        default=0.0,
        help="weight of the image embedding's regression onto the teacher's pooled vector",
    )
    ap.add_argument(
        "--init",
        default=None,
        help="start from DIR's model (and teacher) weights, step 0, a fresh optimiser",
    )
    ap.add_argument(
        "--patch-weight",
        type=float,
        default=0.0,
        help="weight of the contrastive loss on the mean of the projected patch features",
    )
    ap.add_argument(
        "--patch-attention",
        choices=ATTENTIONS,
        default="vanilla",
        help="which dense-feature variant the patch loss reads (clipadapt.backbones.dense)",
    )
    ap.add_argument(
        "--region-weight",
        type=float,
        default=0.0,
        help="weight of the region loss: each object's and the background's pooled dense "
        "features against a phrase naming it (the world's masks say which patches they hold)",
    )
    ap.add_argument(
        "--region-attention",
        choices=ATTENTIONS,
        default="maskclip",
        help="which dense-feature variant the region loss reads (default: the value path, "
        "which no compared attention is by itself)",
    )
    ap.add_argument(
        "--background-captions",
        type=float,
        default=0.0,
        help="share of captions that also name the background texture (on a grid background)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    open_clip.add_model_config(ASSETS)
    torch.manual_seed(args.seed)
    model = open_clip.create_model("tiny-shapes", pretrained=None)
    tokenizer = open_clip.get_tokenizer("tiny-shapes")
    size = (
        model.visual.image_size[0]
        if isinstance(model.visual.image_size, tuple)
        else model.visual.image_size
    )
    distiller = None
    if args.teacher != "none":
        torch.manual_seed(args.seed + 1)
        embed_dim = model.text_projection.shape[1]
        out_dim = len(FACT_COLUMNS) if args.teacher == "facts" else embed_dim
        layers = [int(v) for v in args.distill_layers.split(",")]
        distiller = Distiller(out_dim, model.visual.conv1.out_channels, embed_dim, layers)
        vit_tokens = distiller.hook(model.visual)
    groups = param_groups(model, args.wd)
    if distiller is not None:  # the facts teacher trains on its own first, then stays frozen
        trained_here = distiller
        if args.teacher == "facts":
            trained_here = torch.nn.ModuleList([distiller.reg, distiller.pooled_reg])
        for g, e in zip(groups, param_groups(trained_here, args.wd), strict=True):
            g["params"] += e["params"]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    if args.init and not (args.resume and (out / "last.safetensors").exists()):
        init = Path(args.init)
        model.load_state_dict(load_file(init / "last.safetensors"))
        if distiller is not None and (init / "last-teacher.safetensors").exists():
            distiller.load_state_dict(load_file(init / "last-teacher.safetensors"))
            if not (out / "teacher.safetensors").exists():
                save_file(distiller.teacher.state_dict(), out / "teacher.safetensors")
    if args.resume and (out / "last.safetensors").exists():
        model.load_state_dict(load_file(out / "last.safetensors"))
        if distiller is not None:
            distiller.load_state_dict(load_file(out / "last-teacher.safetensors"))
        state = json.loads((out / "last.json").read_text())
        start = state["step"]
        opt_state = load_file(out / "last-opt.safetensors")
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            if f"{i}.step" not in opt_state:  # never updated (e.g. an unused loss's head)
                continue
            opt.state[p] = {
                "step": opt_state[f"{i}.step"],
                "exp_avg": opt_state[f"{i}.exp_avg"],
                "exp_avg_sq": opt_state[f"{i}.exp_avg_sq"],
            }
    sets = eval_sets(args.seed + 1, 400, size)
    loader = torch.utils.data.DataLoader(
        Batches(
            args.seed,
            args.batch,
            size,
            tokenizer,
            start,
            args.easy_steps,
            args.easy_share,
            (args.centre_steps, args.spread_steps),
            args.background_captions,
            model.visual.grid_size[0] if args.region_weight else 0,
        ),
        batch_size=None,
        num_workers=1,
        prefetch_factor=4,
        persistent_workers=True,
    )
    if args.teacher == "facts":
        train_teacher(distiller.teacher, args, size, out, sets)
        distiller.teacher.requires_grad_(False).eval()
    # What made these weights (exported as the checkpoint's metadata): this command, and the
    # recipe of the run it started from.
    recipe = {"command": " ".join(["scripts/pretrain_tiny_shapes.py", *sys.argv[1:]])}
    if args.init:
        init_json = Path(args.init) / "last.json"
        recipe["init"] = json.loads(init_json.read_text()) if init_json.exists() else args.init
    log = open(out / "log.jsonl", "a")
    last_input: list[torch.Tensor] = []
    if args.patch_weight or args.region_weight:
        model.visual.transformer.resblocks[-1].register_forward_pre_hook(
            lambda _m, inputs: last_input.__setitem__(slice(None), [inputs[0]])
        )
    model.train()
    t0 = time.time()
    for step, (images, tokens, img_f, cap_f, *regions) in enumerate(loader, start=start):
        if step >= args.steps:
            break
        lr = (
            args.lr
            * min(1.0, (step + 1) / args.warmup)
            * 0.5
            * (1 + math.cos(math.pi * step / args.steps))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        x = to_input(images)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            img = model.encode_image(x)
            txt = model.encode_text(tokens)
            if args.patch_weight:
                patch_img = patch_embedding(model, last_input[0], args.patch_attention)
            if args.region_weight:
                cover, owner, region_f, phrase_tokens, phrase_f = regions
                region_img = region_embedding(
                    model, last_input[0], args.region_attention, cover, owner
                )
                phrase_txt = model.encode_text(phrase_tokens)
            if args.teacher == "captions":
                fmap, pooled = distiller.teacher.features(x)
                t_img = distiller.teacher.top[-1](pooled)
            elif args.teacher == "facts":
                with torch.no_grad():
                    fmap, pooled = distiller.teacher.features(x)
        raw_img = img
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        scale = model.logit_scale.exp()
        loss = contrastive_loss(img, txt, scale, img_f, cap_f)
        if args.patch_weight:
            patch_img = F.normalize(patch_img.float(), dim=-1)
            patch_loss = contrastive_loss(patch_img, txt, scale, img_f, cap_f)
            loss = loss + args.patch_weight * patch_loss
        if args.region_weight:
            phrase_txt = F.normalize(phrase_txt.float(), dim=-1)
            region_img = F.normalize(region_img.float(), dim=-1)
            region_loss = contrastive_loss(region_img, phrase_txt, scale, region_f, phrase_f)
            loss = loss + args.region_weight * region_loss
        if args.teacher == "captions":
            t_img = F.normalize(t_img.float(), dim=-1)
            loss = loss + contrastive_loss(t_img, txt, scale, img_f, cap_f)
        if distiller is not None:
            d_loss = distiller.dense_loss(vit_tokens, fmap)
            loss = loss + args.distill_weight * d_loss
            if args.pooled_weight:
                p_loss = distiller.pooled_loss(raw_img, pooled)
                loss = loss + args.pooled_weight * p_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 25 == 0:
            dense = f"dense {d_loss.item():.3f} " if distiller else ""
            if distiller and args.pooled_weight:
                dense += f"pooled {p_loss.item():.3f} "
            if args.patch_weight:
                dense += f"patch {patch_loss.item():.3f} "
            if args.region_weight:
                dense += f"region {region_loss.item():.3f} "
            print(
                f"step {step + 1} loss {loss.item():.4f} {dense}"
                f"scale {model.logit_scale.exp().item():.1f} "
                f"lr {lr:.2e} {(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            accs = evaluate(model, tokenizer, sets)
            if args.teacher == "captions":
                classify = zero_shot_classifier(model, tokenizer, sets)
                accs["teacher_shape"] = teacher_accuracy(distiller.teacher, sets, classify)
            rec = {
                "step": step + 1,
                "loss": loss.item(),
                "minutes": (time.time() - t0) / 60,
                **accs,
            }
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            save_checkpoint(model, opt, out, step + 1, recipe)
            if distiller is not None:
                save_file(distiller.state_dict(), out / "last-teacher.safetensors")
    if args.export:
        export(model, out / "last.json")


def save_checkpoint(model, opt, out: Path, step: int, recipe: dict) -> None:
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, out / "last.safetensors.tmp"
    )
    opt_state = {}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for k, v in opt.state.get(p, {}).items():
            opt_state[f"{i}.{k}"] = v.reshape(-1) if k == "step" else v
    save_file(opt_state, out / "last-opt.safetensors.tmp")
    (out / "last.safetensors.tmp").replace(out / "last.safetensors")
    (out / "last-opt.safetensors.tmp").replace(out / "last-opt.safetensors")
    (out / "last.json").write_text(json.dumps({"step": step, **recipe}))


def export(model, meta_path: Path) -> None:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in json.loads(meta_path.read_text()).items()
    }
    path = ASSETS / "model.safetensors"
    save_file(state, path, metadata={"source": "scripts/pretrain_tiny_shapes.py", **meta})
    path.chmod(0o644)
    print("exported", ASSETS / "model.safetensors")


if __name__ == "__main__":
    main()
