"""GDA, LP++, CLAP, ProKeR and TaskRes against plain formulations of their equations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_cli_fewshot import _fit, world  # noqa: F401  (the module-scoped fixture)

from clipadapt import cli, methods
from clipadapt.features.featureset import FeatureSet
from clipadapt.methods import clap as clap_mod
from clipadapt.methods import gda as gda_mod
from clipadapt.methods import load_adapter
from clipadapt.methods import lp_plus_plus as lpp_mod
from clipadapt.methods import proker as proker_mod

NEW = ["gda", "lp++", "clap", "proker", "taskres"]


def _task(c=5, k=4, d=16, views=3, n_val=3, seed=0):
    """Random FeatureSets: train (k per class, with views) and val; unit-norm text weights."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g)
    y = torch.arange(c).repeat_interleave(k)
    feats = centres[y] + 0.8 * torch.randn(len(y), d, generator=g)
    v = feats[None] + 0.3 * torch.randn(views, len(y), d, generator=g)
    yv = torch.arange(c).repeat_interleave(n_val)
    fv = centres[yv] + 0.8 * torch.randn(len(yv), d, generator=g)
    names = [f"c{i}" for i in range(c)]
    text = F.normalize(centres + 1.5 * torch.randn(c, d, generator=g), dim=-1)
    train = FeatureSet(features=feats, labels=y, classnames=names, views=v)
    return train, FeatureSet(features=fv, labels=yv, classnames=names), text


# -- GDA --------------------------------------------------------------------------------------
def test_gda_matches_its_equations_and_a_direct_solve():
    train, val, text = _task()
    m = methods.get("gda").fit(train, text, val=val)
    x = F.normalize(train.views.double(), dim=-1).flatten(0, 1)
    y = train.labels.repeat(train.views.shape[0])
    n, d = x.shape
    c = text.shape[0]
    mu = torch.stack([x[y == k].mean(0) for k in range(c)])
    z = torch.cat([x[y == k] - mu[k] for k in range(c)])
    s = torch.cov(z.T)  # unbiased, rows = variables
    a = (n - 1) * s + s.trace() * torch.eye(d, dtype=torch.float64)
    w = d * torch.linalg.solve(a, mu.T).T  # P μ_c with P = D · A⁻¹
    b = math.log(1 / c) - 0.5 * (w * mu).sum(1)
    torch.testing.assert_close(m.weight.double(), w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m.bias.double(), b, rtol=1e-5, atol=1e-4)
    # the α search: the naive loop, strict ">" from 0, grid ascending
    f = F.normalize(val.features.double(), dim=-1)
    best, best_alpha = 0.0, 0.1
    for alpha in (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0):
        acc = float(
            ((100 * f @ text.double().T + alpha * (f @ w.T + b)).argmax(1) == val.labels)
            .double()
            .mean()
        )
        if acc > best:
            best, best_alpha = acc, alpha
    assert m.fitted["alpha"] == best_alpha
    want = 100 * f @ text.double().T + best_alpha * (f @ w.T + b)
    torch.testing.assert_close(m.logits(val).double(), want, rtol=1e-4, atol=1e-3)


def test_gda_pooled_precision_is_the_mean_class_covariance_inverse():
    train, _, text = _task(k=6, d=8)
    m = methods.get("gda", precision="pooled").fit(train, text)
    x = F.normalize(train.views.double(), dim=-1).flatten(0, 1)
    y = train.labels.repeat(train.views.shape[0])
    mu = torch.stack([x[y == k].mean(0) for k in range(5)])
    s = torch.stack([torch.cov(x[y == k].T) for k in range(5)]).mean(0)
    w = torch.linalg.solve(s, mu.T).T
    torch.testing.assert_close(m.weight.double(), w, rtol=1e-4, atol=1e-3)


def test_gda_novel_classes_follow_the_base2new_script():
    train, val, text = _task(c=5, k=8, d=8)
    train = train.subset(torch.nonzero(train.labels < 3)[:, 0])  # base classes 0-2
    m = methods.get("gda", novel_topk=5, novel_text_copies=3).fit(train, text[:3])
    support = F.normalize(train.views.double(), dim=-1).flatten(0, 1)
    novel = text[3:].double()
    d = support.shape[1]
    mus, p = [], torch.zeros(d, d, dtype=torch.float64)
    for t in novel:
        sims = support @ t
        near = support[sims.argsort(descending=True)[:5]]
        mus.append(torch.cat([near, t.repeat(3, 1)]).mean(0))
        cov = (near - t).T @ (near - t) / 4
        p += d * torch.linalg.inv(4 * cov + cov.trace() * torch.eye(d, dtype=torch.float64))
    p /= len(novel)
    mu = torch.stack(mus)
    w = mu @ p
    b = math.log(1 / len(novel)) - 0.5 * (w * mu).sum(1)
    f = F.normalize(val.features.double(), dim=-1)
    want = 100 * f @ novel.T + m.fitted["alpha"] * (f @ w.T + b)
    torch.testing.assert_close(m.novel_logits(val, text[3:]).double(), want, rtol=1e-4, atol=1e-3)


def test_gda_estimator_is_near_bayes_optimal_on_shared_covariance_gaussians():
    g = torch.Generator().manual_seed(3)
    c, d, per_class, n_test = 4, 32, 200, 20000
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    cov = a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    means = 0.45 * torch.randn(c, d, generator=g, dtype=torch.float64)

    def draw(n):
        y = torch.randint(c, (n,), generator=g)
        return means[y] + torch.randn(n, d, generator=g, dtype=torch.float64) @ chol.T, y

    x, y = draw(c * per_class)
    xt, yt = draw(n_test)
    mu = gda_mod.class_means(x, y, c)
    w, b = gda_mod.linear_head(mu, gda_mod.shrinkage_precision(x - mu[y]))
    acc = float(((xt @ w.T + b).argmax(1) == yt).double().mean())
    w0, b0 = gda_mod.linear_head(means, torch.linalg.inv(cov))  # the true parameters
    bayes = float(((xt @ w0.T + b0).argmax(1) == yt).double().mean())
    assert 0.5 < bayes < 0.95  # a task where the estimate matters
    assert abs(acc - bayes) <= 0.01, (acc, bayes)


# -- LP++ -------------------------------------------------------------------------------------
def _lpp_naive(x, y, xv, yv, t, epochs, bias0, alpha_grad="accumulated"):
    """LP++ by hand: explicit gradients of the mean cross-entropy, heavy-ball SGD on (W, b),
    α stepped every 10 epochs with the summed (or last) gradient, last epoch with val >= best."""
    n, d = x.shape
    c = t.shape[0]
    w = torch.stack([x[y == k].sum(0) for k in range(c)])
    b = bias0.clone()
    own = torch.stack([(x[y == k] @ t[k]).mean() for k in range(c)])
    alpha = 250 * own.mean() * torch.ones(c)
    lr_w = 4 * n / torch.linalg.eigvalsh(x.T @ x).max()
    zt = x @ t.T
    lr_a = n / (4 * (zt**2).sum(0).max())
    vw, vb, ga = torch.zeros_like(w), torch.zeros_like(b), torch.zeros(c)
    onehot = F.one_hot(y, c).double()
    best, state = 0.0, None
    for epoch in range(epochs):
        logits = x @ w.T + b + alpha * zt
        g = (logits.softmax(1) - onehot) / n
        gw, gb, galpha = g.T @ x, g.sum(0), (g * zt).sum(0)
        ga = ga + galpha if alpha_grad == "accumulated" else galpha
        vw, vb = 0.9 * vw + gw if epoch else gw, 0.9 * vb + gb if epoch else gb
        w, b = w - lr_w * vw, b - lr_w * vb
        if (epoch + 1) % 10 == 0:
            alpha = alpha - lr_a * ga
        acc = float(((xv @ w.T + b + alpha * (xv @ t.T)).argmax(1) == yv).double().mean())
        if acc >= best:
            best, state = acc, (w, b, alpha)
    return state


@pytest.mark.parametrize("alpha_grad", ["accumulated", "current"])
def test_lp_plus_plus_matches_explicit_gradient_descent(alpha_grad):
    train, val, text = _task(c=4, k=5, d=12, views=1)
    m = methods.get("lp++", epochs=35, alpha_grad=alpha_grad).fit(train, text, val=val)
    x = F.normalize(train.views[0].double(), dim=-1)
    xv = F.normalize(val.features.double(), dim=-1)
    bias0 = (torch.rand(4, generator=torch.Generator().manual_seed(1)) * 2 - 1) / math.sqrt(12)
    w, b, alpha = _lpp_naive(
        x, train.labels, xv, val.labels, text.double(), 35, bias0.double(), alpha_grad
    )
    torch.testing.assert_close(m.weight.double(), w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.bias.double(), b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.alpha.double(), alpha, rtol=1e-4, atol=1e-4)
    assert m.fitted["alpha_init"] == pytest.approx(
        float(
            250
            * torch.stack(
                [(x[train.labels == k] @ text.double()[k]).mean() for k in range(4)]
            ).mean()
        ),
        rel=1e-5,
    )


def test_lp_plus_plus_step_sizes():
    x = F.normalize(torch.randn(30, 8, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    top = max(torch.linalg.eigvals(x.T @ x).real)
    assert lpp_mod.lr_weight(x) == pytest.approx(float(4 * 30 / top), rel=1e-9)
    sums = [sum(float(x[i] @ t[k]) ** 2 for i in range(30)) for k in range(3)]
    assert lpp_mod.lr_alpha(x, t) == pytest.approx(30 / (4 * max(sums)), rel=1e-9)


# -- CLAP -------------------------------------------------------------------------------------
def test_clap_multipliers_and_penalty():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(40, 6, generator=g), torch.randn(3, 6, generator=g)
    y = torch.randint(3, (40,), generator=g)
    lam = clap_mod.class_multipliers(x, y, t, 50.0)
    for k in range(3):
        logits = 50 * F.normalize(x[y == k], dim=-1) @ F.normalize(t, dim=-1).T
        assert float(lam[k]) == pytest.approx(float(logits.softmax(1)[:, k].mean()), rel=1e-5)
    w = t + torch.randn(3, 6, generator=g)
    want = sum(float(lam[k]) * float(((w[k] - t[k]) ** 2).sum()) for k in range(3)) / 3
    assert float(clap_mod.constraint_penalty(w, t, lam)) == pytest.approx(want, rel=1e-5)
    new, rho = clap_mod.outer_step(w, t, lam, torch.full((3,), 2.0))
    h = ((w - t) ** 2).sum(1)
    torch.testing.assert_close(new, torch.clamp(lam + 2.0 * h, min=0))
    torch.testing.assert_close(rho, h)


@pytest.mark.parametrize("constraint", ["l2", "adaptive", "none"])
def test_clap_training_matches_a_plain_loop(constraint):
    train, _, text = _task(c=4, k=5, d=10, views=3)
    text = 3.0 * text  # CLAP uses the text vectors as given, norms included
    m = methods.get("clap", epochs=4, batch_size=8, constraint=constraint, scale=30.0)
    m.fit(train, text)
    x = train.views.flatten(0, 1)
    y = train.labels.repeat(3)
    p0 = (30 * F.normalize(x, dim=-1) @ F.normalize(text, dim=-1).T).softmax(1)
    lam = torch.stack([p0[y == k, k].mean() for k in range(4)])
    rho = torch.zeros(4)
    w, buf = text.clone(), None
    gen = torch.Generator().manual_seed(1)
    for epoch in range(4):
        lr = 1e-5 if epoch == 0 else 0.05 * (1 + math.cos(math.pi * (epoch - 1) / 4))
        order = torch.randperm(len(x), generator=gen)
        for step in range(20 // 8):  # ⌊K·C / batch⌋ steps from the pool of views
            i = order[step * 8 : (step + 1) * 8]
            wv = w.clone().requires_grad_(True)
            loss = F.cross_entropy(30 * F.normalize(x[i], dim=-1) @ F.normalize(wv, dim=-1).T, y[i])
            if constraint != "none":
                loss = loss + sum(lam[k] * ((wv[k] - text[k]) ** 2).sum() for k in range(4)) / 4
            (grad,) = torch.autograd.grad(loss, wv)
            buf = grad if buf is None else 0.9 * buf + grad
            w = w - lr * buf
        if constraint == "adaptive":
            h = ((w - text) ** 2).sum(1)
            lam, rho = torch.clamp(lam + rho * h, min=0), h
    torch.testing.assert_close(m.prototypes, w, rtol=1e-4, atol=1e-5)


# -- ProKeR -----------------------------------------------------------------------------------
def test_proker_closed_form_and_search_match_direct_solves():
    train, val, text = _task(c=4, k=3, d=10, views=2)
    betas, lmbdas = (0.5, 2.0, 4), (0.01, 1.0, 3)
    m = methods.get("proker", beta_grid=betas, lmbda_grid=lmbdas).fit(train, text, val=val)
    x = F.normalize(train.views.double(), dim=-1).flatten(0, 1)
    y = train.labels.repeat(2)
    t = text.double()
    f = F.normalize(val.features.double(), dim=-1)

    def k(a, b, beta):
        return torch.tensor([[math.exp(-beta * (1 - float(u @ v))) for v in b] for u in a])

    def fit(beta, lmbda):
        kss = k(x, x, beta).double()
        return torch.linalg.solve(kss / lmbda + torch.eye(len(x)), F.one_hot(y, 4) - x @ t.T)

    def logits(beta, a):
        return f @ t.T + k(f, x, beta).double() @ a

    best = (None, None, 0.0)
    for beta in torch.linspace(*betas[:2], betas[2]).tolist():
        for lmbda in torch.linspace(*lmbdas[:2], lmbdas[2]).tolist():
            acc = float((logits(beta, fit(beta, lmbda)).argmax(1) == val.labels).double().mean())
            if acc > best[2]:
                best = (beta, lmbda, acc)
    assert (m.fitted["beta"], m.fitted["lmbda"]) == pytest.approx(best[:2])
    assert m.fitted["val_accuracy"] == pytest.approx(best[2])
    a = fit(best[0], best[1])
    torch.testing.assert_close(m.dual.double(), a, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(m.logits(val).double(), logits(best[0], a), rtol=1e-3, atol=1e-4)


def test_proker_recipes():
    assert proker_mod.grid_for("OxfordPets") == ((0.01, 5, 40), (0.01, 0.3, 20))
    assert proker_mod.grid_for("imagenet-sketch") == proker_mod.GRIDS["imagenet"]
    assert proker_mod.fixed_for(16) == (1.7, 0.1) and proker_mod.fixed_for(3) == (2.6, 0.05)
    train, _, text = _task(k=4)
    m = methods.get("proker").fit(train, text)  # no validation: ImageNet's transferred values
    assert (m.fitted["beta"], m.fitted["lmbda"]) == (1.5, 0.05)


# -- TaskRes ----------------------------------------------------------------------------------
def test_taskres_logits_and_recipe():
    train, val, text = _task(k=4)
    m = methods.get("taskres", epochs=3, scale=50.0).fit(train, text, val=val)
    assert m.fitted["alpha"] == 0.5 and m.fitted["lr"] == 2e-3
    r = m.head.residual.detach()
    assert r.abs().sum() > 0  # it trained
    f = F.normalize(val.features, dim=-1)
    want = 50 * f @ F.normalize(text + 0.5 * r, dim=-1).T
    torch.testing.assert_close(m.logits(val), want, rtol=1e-5, atol=1e-4)
    cfg = methods.get("taskres", dataset="Flowers102").config
    assert cfg.resolved(16) == {"alpha": 1.0, "epochs": 200, "lr": 2e-3}
    assert methods.get("taskres", dataset="imagenet").config.resolved(4)["lr"] == 2e-4
    assert cfg.resolved(4)["epochs"] == 100


# -- every new method ---------------------------------------------------------------------------
FAST = {
    "gda": {},
    "lp++": {"epochs": 20},
    "clap": {"epochs": 3, "batch_size": 8},
    "proker": {"beta_grid": (1.0, 2.0, 2), "lmbda_grid": (0.1, 1.0, 2)},
    "taskres": {"epochs": 2},
}


@pytest.mark.parametrize("name", NEW)
def test_save_and_load_give_identical_logits(name, tmp_path):
    train, val, text = _task()
    m = methods.get(name, **FAST[name]).fit(train, text, val=val)
    m.save(tmp_path / name)
    loaded = load_adapter(tmp_path / name)
    assert torch.equal(loaded.logits(val), m.logits(val))
    assert loaded.fitted == json.loads(json.dumps(m.fitted))


@pytest.mark.parametrize("name", NEW)
def test_fit_and_eval_from_the_command_line(world, tmp_path, name):  # noqa: F811
    out = tmp_path / name
    pairs = [
        f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in FAST[name].items()
    ]
    extra = [a for p in pairs for a in ("--hparam", p)]
    assert _fit(world, out, name, *extra) == 0
    doc = json.loads((out / "config.json").read_text())
    assert doc["method"] == name
    result = tmp_path / "result.json"
    argv = [
        "eval",
        "--adapter",
        str(out),
        "--data",
        str(world["toy_a"]),
        "--cache",
        str(world["cache"]),
        "--num-workers",
        "0",
        "--out",
        str(result),
    ]
    assert cli.main(argv) == 0
    record = json.loads(result.read_text())
    assert record["method"] == name and 0.0 <= record["metrics"]["top1"] <= 100.0


def test_gda_under_base2novel_uses_its_own_novel_classifier_and_pooled_base():
    from clipadapt.protocols import base2novel

    class FakeBackbone:
        logit_scale = 100.0

    m = base2novel._build("gda", {}, bb=FakeBackbone(), dataset="toy", seed=1, device="cpu")
    assert m.config.precision == "pooled"  # main_base2new.py's base-class estimator
    explicit = base2novel._build(
        "gda", {"precision": "shrinkage"}, bb=FakeBackbone(), dataset="toy", seed=1, device="cpu"
    )
    assert explicit.config.precision == "shrinkage"
    train, val, text = _task(c=5, k=8, d=8)
    base = train.subset(torch.nonzero(train.labels < 3)[:, 0])
    m.fit(base, text[:3])
    got = base2novel.novel_logits(m, val, text[3:])
    assert torch.equal(got, m.novel_logits(val, text[3:]))
    zero_shot = 100 * F.normalize(val.features, dim=-1) @ text[3:].T
    assert not torch.allclose(got, zero_shot)  # not the zero-shot fallback
    assert "synthesised" in base2novel.novel_rule("gda")


def test_clap_and_taskres_train_from_unnormalised_class_prototypes(world, tmp_path, monkeypatch):  # noqa: F811
    import clipadapt as ca
    from clipadapt.methods.clap import Clap

    seen = []
    fit = Clap.fit

    def spy(self, train, text_weights, val=None):
        seen.append(text_weights.clone())
        return fit(self, train, text_weights, val=val)

    monkeypatch.setattr(Clap, "fit", spy)
    out = tmp_path / "clap"
    assert _fit(world, out, "clap", "--hparam", "epochs=1") == 0
    doc = json.loads((out / "config.json").read_text())
    classnames, templates = doc["meta"]["classnames"], doc["meta"]["templates"]
    bb = ca.load_backbone(doc["meta"]["backbone"]["name"], str(world["weights"]))
    names = [c.replace("_", " ") for c in classnames]
    raw = bb.encode_texts([t.format(c) for c in names for t in templates], normalize=False)
    want = raw.reshape(len(names), len(templates), -1).mean(1)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want.norm(dim=-1), torch.ones(len(names)))
    assert methods.get_class("taskres").unit_text is False
    assert methods.get_class("gda").unit_text is True
