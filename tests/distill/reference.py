"""Float64 numpy/scipy references of the distillation losses, written from the papers'
formulas (explicit loops where that is clearer), independent of the JAX code."""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.special import log_softmax, softmax


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def onehot(labels, c: int) -> np.ndarray:
    return np.eye(c)[np.asarray(labels)]


def kd(zs, zt, labels, t, alpha, *, soft="kl", eps=0.0, standardize=False):
    """Per-example Hinton KD, float64."""
    zs, zt = f64(zs), f64(zt)
    c = zs.shape[-1]
    y = onehot(labels, c) if np.asarray(labels).ndim == zs.ndim - 1 else f64(labels)
    y = (1 - eps) * y + eps / c
    hard = -(y * log_softmax(zs, axis=-1)).sum(-1)
    if standardize:
        zs, zt = standardize_ref(zs), standardize_ref(zt)
    log_p, log_q = log_softmax(zs / t, axis=-1), log_softmax(zt / t, axis=-1)
    q = np.exp(log_q)
    if soft == "kl":
        s = (q * (log_q - log_p)).sum(-1)
    else:
        s = -(q * log_p).sum(-1)
    return (1 - alpha) * hard + alpha * t * t * s


def standardize_ref(z, eps=1e-7):
    z = f64(z)
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + eps)


def dkd(zs, zt, labels, t, alpha, beta):
    """Per-example DKD, float64, following the authors' formulation with explicit masks."""
    zs, zt = f64(zs), f64(zt)
    out = []
    for i, g in enumerate(np.asarray(labels)):
        p, q = softmax(zs[i] / t), softmax(zt[i] / t)
        bp, bq = np.array([p[g], 1 - p[g]]), np.array([q[g], 1 - q[g]])
        tckd = (bq * (np.log(bq) - np.log(bp))).sum()
        keep = np.arange(len(p)) != g
        ph = softmax(zs[i][keep] / t)
        qh = softmax(zt[i][keep] / t)
        nckd = (qh * (np.log(qh) - np.log(ph))).sum()
        out.append(t * t * (alpha * tckd + beta * nckd))
    return np.array(out)


def _pearson(u, v, eps):
    u, v = u - u.mean(), v - v.mean()
    return (u @ v) / (np.linalg.norm(u) * np.linalg.norm(v) + eps)


def dist(zs, zt, t, beta, gamma, eps=1e-8):
    ys, yt = softmax(f64(zs) / t, axis=-1), softmax(f64(zt) / t, axis=-1)
    inter = 1 - np.mean([_pearson(ys[i], yt[i], eps) for i in range(ys.shape[0])])
    intra = 1 - np.mean([_pearson(ys[:, c], yt[:, c], eps) for c in range(ys.shape[1])])
    return t * t * (beta * inter + gamma * intra)


def hint(u, v, w=None, b=None):
    u = f64(u)
    if w is not None:
        u = u @ f64(w) + f64(b)
    return np.mean((u - f64(v)) ** 2)


def at(fs, ft, p=2.0):
    def amap(a):
        a = f64(a)
        q = (np.abs(a) ** p).mean(-1).reshape(a.shape[0], -1)
        return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)  # F.normalize

    return np.mean((amap(fs) - amap(ft)) ** 2)


def _huber(x):
    a = np.abs(x)
    return np.where(a < 1, 0.5 * x * x, a - 0.5)


def rkd_distance(fs, ft):
    def psi(f):
        f = f64(f).reshape(len(f), -1)
        b = len(f)
        d = {(i, j): np.linalg.norm(f[i] - f[j]) for i in range(b) for j in range(b) if i != j}
        mu = np.mean(list(d.values()))
        return {k: v / mu for k, v in d.items()}

    ps, pt = psi(fs), psi(ft)
    return np.mean([_huber(ps[k] - pt[k]) for k in ps])


def rkd_angle(fs, ft):
    def psi(f):
        f = f64(f).reshape(len(f), -1)
        out = {}
        for i, j, k in itertools.permutations(range(len(f)), 3):
            e1, e2 = f[j] - f[i], f[k] - f[i]
            out[i, j, k] = e1 @ e2 / (np.linalg.norm(e1) * np.linalg.norm(e2))
        return out

    ps, pt = psi(fs), psi(ft)
    return np.mean([_huber(ps[k] - pt[k]) for k in ps])


def rkd_authors(fs, ft):
    """``(L_D, L_A)`` as the RKD authors' code computes them: smooth-L1 means over all
    ``B²`` distance and ``B³`` angle entries, ``μ`` the mean of the positive distances."""

    def dist(f):
        f = f64(f).reshape(len(f), -1)
        d = np.linalg.norm(f[:, None] - f[None], axis=-1)
        return d / d[d > 0].mean()

    def angle(f):
        f = f64(f).reshape(len(f), -1)
        e = f[None] - f[:, None]  # e[i, j] = f_j - f_i
        n = np.linalg.norm(e, axis=-1, keepdims=True)
        e = np.where(n > 0, e / np.where(n > 0, n, 1.0), 0.0)  # F.normalize
        return np.einsum("ijd,ikd->ijk", e, e)

    return np.mean(_huber(dist(fs) - dist(ft))), np.mean(_huber(angle(fs) - angle(ft)))


def sp(fs, ft):
    def g(f):
        f = f64(f).reshape(len(f), -1)
        m = f @ f.T
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)  # F.normalize

    b = len(fs)
    return np.sum((g(fs) - g(ft)) ** 2) / b**2


def pkt(fs, ft, eps=1e-7):
    def probs(f):
        f = f64(f).reshape(len(f), -1)
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
        k = (f @ f.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = probs(fs), probs(ft)
    return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def crd(s, t, index, rows, mem_s, mem_t, z_s, z_t, n, tau=0.07, momentum=0.5, eps=1e-7):
    """CRD (Tian et al. 2020, the authors' ``CRDLoss``) in float64 with explicit loops:
    ``rows[i]`` are example ``i``'s bank rows (positive first). Returns ``(loss, mem_s,
    mem_t, z_s, z_t)`` after the update."""
    unit = lambda v: v / np.linalg.norm(v)
    s = np.stack([unit(v) for v in f64(s)])
    t = np.stack([unit(v) for v in f64(t)])
    mem_s, mem_t = f64(mem_s).copy(), f64(mem_t).copy()
    b, k1 = np.shape(rows)
    exp_s = np.array([[np.exp(mem_t[rows[i][j]] @ s[i] / tau) for j in range(k1)] for i in range(b)])
    exp_t = np.array([[np.exp(mem_s[rows[i][j]] @ t[i] / tau) for j in range(k1)] for i in range(b)])
    z_s = exp_s.mean() * n if z_s < 0 else z_s
    z_t = exp_t.mean() * n if z_t < 0 else z_t

    def nce(p):
        noise = (k1 - 1) / n
        total = 0.0
        for i in range(b):
            total += np.log(p[i, 0] / (p[i, 0] + noise + eps))
            total += sum(np.log(noise / (p[i, j] + noise + eps)) for j in range(1, k1))
        return -total / b

    loss = nce(exp_s / z_s) + nce(exp_t / z_t)
    for i, row in enumerate(np.asarray(index)):
        mem_s[row] = unit(mem_s[row] * momentum + s[i] * (1 - momentum))
        mem_t[row] = unit(mem_t[row] * momentum + t[i] * (1 - momentum))
    return loss, mem_s, mem_t, z_s, z_t


def _maps(f):
    """``[B, P, C]`` float64 of channels-last maps."""
    f = f64(f)
    return f.reshape(f.shape[0], -1, f.shape[-1])


def fsp(student_pairs, teacher_pairs, weights):
    """FSP (Yim et al. 2017): per example ``G_ij = Σ_p F1[p, i] F2[p, j] / P``, squared
    Frobenius distances summed over pairs, averaged over examples; explicit loops."""
    total = 0.0
    for (s1, s2), (t1, t2), w in zip(student_pairs, teacher_pairs, weights):
        s1, s2, t1, t2 = _maps(s1), _maps(s2), _maps(t1), _maps(t2)
        b, p = s1.shape[:2]
        for n in range(b):
            gs = np.zeros((s1.shape[2], s2.shape[2]))
            gt = np.zeros_like(gs)
            for i in range(gs.shape[0]):
                for j in range(gs.shape[1]):
                    gs[i, j] = sum(s1[n, q, i] * s2[n, q, j] for q in range(p)) / p
                    gt[i, j] = sum(t1[n, q, i] * t2[n, q, j] for q in range(p)) / p
            total += w * ((gs - gt) ** 2).sum() / b
    return total


def nst(fs, ft, degree=2, bias=0.0):
    """NST (Huang & Wang 2017): squared MMD of the normalised channel patterns, per example,
    averaged; explicit sums over channel pairs."""
    s, t = _maps(fs), _maps(ft)
    out = 0.0
    for n in range(s.shape[0]):
        sc = [s[n, :, j] / np.linalg.norm(s[n, :, j]) for j in range(s.shape[2])]
        tc = [t[n, :, i] / np.linalg.norm(t[n, :, i]) for i in range(t.shape[2])]
        k = lambda a, b: np.mean([(x @ y + bias) ** degree for x in a for y in b])
        out += (k(tc, tc) + k(sc, sc) - 2 * k(sc, tc)) / s.shape[0]
    return out


def cc(fs, ft, gamma=0.4, order=2, kernel="gaussian"):
    """CC (Peng et al. 2019): ``‖C_s − C_t‖²_F / B²`` with the Taylor-expanded Gaussian
    kernel on L2-normalised features (or the bilinear one)."""

    def corr(f):
        f = f64(f).reshape(len(f), -1)
        if kernel == "bilinear":
            return f @ f.T
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        b = len(f)
        c = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                x = f[i] @ f[j]
                c[i, j] = np.exp(-2 * gamma) * sum(
                    (2 * gamma) ** p / math.factorial(p) * x**p for p in range(order + 1)
                )
        return c

    cs, ct = corr(fs), corr(ft)
    return ((cs - ct) ** 2).sum() / len(cs) ** 2


def vid(mu, t, log_scale, eps=1e-5):
    """VID (Ahn et al. 2019): mean Gaussian NLL with ``σ² = softplus(α) + eps``, constant dropped."""
    var = np.log1p(np.exp(f64(log_scale))) + eps
    return np.mean(0.5 * ((f64(mu) - f64(t)) ** 2 / var + np.log(var)))
