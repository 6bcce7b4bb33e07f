"""L2-regularised logistic regression in NumPy: scikit-learn's ``LogisticRegression``
objective, fitted on the device without scikit-learn, scipy or torch.

The objective is scikit-learn's (lbfgs solver, ``penalty="l2"``)::

    sum_i s_i * loss_i / S + ||W||^2 / (2 * C * S),   S = sum_i s_i

with ``s_i`` the sample weights (1, or the class weights), the intercept not penalised.
Two labels use the binomial loss with one weight vector, as scikit-learn does for a
binary problem (stored as two rows ``[0, w]`` so a softmax gives ``sigmoid(w·x + b)``);
three or more use the multinomial (softmax) loss with one row per label. The objective
is strictly convex, so any solver that converges finds the same minimum; this one is
L-BFGS with a backtracking (Armijo) line search, deterministic for given inputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_slm.errors import InvalidArgumentError

Array = npt.NDArray[np.float64]
ClassWeight = str | Mapping[str, float] | None

DEFAULT_C = 1.0
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 1000
_HISTORY = 10  # L-BFGS correction pairs kept


@dataclass(frozen=True, eq=False)  # holds arrays: compare by identity
class LinearHead:
    """A fitted head: ``logits = x @ weight.T + bias``; softmax gives probabilities.

    Attributes:
        weight: ``[labels, dim]`` (row 0 is zero for a binary head).
        bias: ``[labels]``.
        labels: label names, in row order.
        iterations: L-BFGS iterations used.
        converged: the gradient fell below the tolerance within ``max_iter``.
    """

    weight: Array
    bias: Array
    labels: tuple[str, ...]
    iterations: int
    converged: bool

    def logits(self, vectors: npt.NDArray[np.floating]) -> Array:
        """Logits ``[n, labels]`` of vectors ``[n, dim]``."""
        return np.asarray(np.asarray(vectors, dtype=np.float64) @ self.weight.T + self.bias)

    def probabilities(self, vectors: npt.NDArray[np.floating]) -> Array:
        """Softmax of :meth:`logits`: scikit-learn's ``predict_proba``."""
        return _softmax(self.logits(vectors))

    def predict(self, vectors: npt.NDArray[np.floating]) -> list[str]:
        """The most probable label of each vector."""
        return [self.labels[i] for i in np.argmax(self.logits(vectors), axis=1)]


def _softmax(z: Array) -> Array:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def sample_weights(
    y: npt.NDArray[np.intp], labels: tuple[str, ...], class_weight: ClassWeight
) -> Array:
    """Per-example weights from ``class_weight``: None (all 1), ``"balanced"``
    (``n / (labels * count(label))``, as scikit-learn) or a dict label -> weight
    (labels it does not name weigh 1)."""
    if class_weight is None:
        return np.ones(len(y))
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise InvalidArgumentError(
                f"class_weight must be None, 'balanced' or a dict label -> weight, "
                f"got {class_weight!r}"
            )
        counts = np.bincount(y, minlength=len(labels)).astype(np.float64)
        per_label = len(y) / (len(labels) * np.maximum(counts, 1.0))
        return np.asarray(per_label[y])
    unknown = sorted(set(class_weight) - set(labels))
    if unknown:
        raise InvalidArgumentError(
            f"class_weight names labels {unknown} that are not in the data; labels: {list(labels)}"
        )
    per_label = np.ones(len(labels))
    for i, label in enumerate(labels):
        value = class_weight.get(label, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InvalidArgumentError(
                f"class_weight[{label!r}] must be a number > 0, got {value!r}"
            )
        per_label[i] = float(value)
    return np.asarray(per_label[y])


def _binomial(
    x: Array, y: npt.NDArray[np.intp], s: Array, alpha: float
) -> Callable[[Array], tuple[float, Array]]:
    """Objective and gradient over ``[w, b]`` for labels 0/1 (label 1 is positive)."""
    sign = np.where(y == 1, 1.0, -1.0)
    total = s.sum()

    def f(params: Array) -> tuple[float, Array]:
        w, b = params[:-1], params[-1]
        margin = sign * (x @ w + b)
        loss = np.logaddexp(0.0, -margin)  # log(1 + exp(-margin)), stable
        # d loss / d z = -sign * sigmoid(-margin)
        dz = -sign * np.exp(-np.logaddexp(0.0, margin)) * s / total
        value = float(s @ loss / total + 0.5 * alpha * (w @ w))
        grad = np.concatenate([x.T @ dz + alpha * w, [dz.sum()]])
        return value, grad

    return f


def _multinomial(
    x: Array, y: npt.NDArray[np.intp], s: Array, alpha: float, k: int
) -> Callable[[Array], tuple[float, Array]]:
    """Objective and gradient over ``[W (k x d), b (k)]`` flattened, softmax loss."""
    n, d = x.shape
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0
    total = s.sum()

    def f(params: Array) -> tuple[float, Array]:
        w = params[: k * d].reshape(k, d)
        b = params[k * d :]
        z = x @ w.T + b
        z = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        loss = log_norm - z[np.arange(n), y]
        value = float(s @ loss / total + 0.5 * alpha * np.sum(w * w))
        dz = (np.exp(z - log_norm[:, None]) - onehot) * (s / total)[:, None]
        grad = np.concatenate([(dz.T @ x + alpha * w).ravel(), dz.sum(axis=0)])
        return value, grad

    return f


def lbfgs(
    f: Callable[[Array], tuple[float, Array]], start: Array, tol: float, max_iter: int
) -> tuple[Array, int, bool]:
    """Minimise a smooth convex ``f`` (value, gradient) from ``start``.

    Stops when the largest gradient component is <= ``tol`` (scikit-learn's lbfgs
    criterion) or after ``max_iter`` iterations. Returns (x, iterations, converged).
    """
    x = start.copy()
    value, grad = f(x)
    pairs: deque[tuple[Array, Array, float]] = deque(maxlen=_HISTORY)
    for iteration in range(max_iter):
        if np.max(np.abs(grad)) <= tol:
            return x, iteration, True
        # Two-loop recursion: direction = -H grad with H from the stored pairs.
        q = grad.copy()
        alphas = []
        for s_vec, y_vec, rho in reversed(pairs):
            a = rho * (s_vec @ q)
            q -= a * y_vec
            alphas.append(a)
        if pairs:
            s_last, y_last, _ = pairs[-1]
            q *= (s_last @ y_last) / (y_last @ y_last)
        else:
            q /= max(1.0, float(np.linalg.norm(grad)))  # a cautious first step
        for (s_vec, y_vec, rho), a in zip(pairs, reversed(alphas), strict=True):
            q += s_vec * (a - rho * (y_vec @ q))
        direction = -q
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction (rounding): restart from the gradient
            pairs.clear()
            direction, slope = -grad, -float(grad @ grad)
        step = 1.0
        while True:  # backtracking until the Armijo condition holds
            candidate = x + step * direction
            new_value, new_grad = f(candidate)
            if new_value <= value + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s_vec, y_vec = candidate - x, new_grad - grad
        curvature = float(s_vec @ y_vec)
        if curvature > 1e-12:
            pairs.append((s_vec, y_vec, 1.0 / curvature))
        if step < 1e-12:  # no progress possible at float64 precision
            return candidate, iteration + 1, bool(np.max(np.abs(new_grad)) <= tol)
        x, value, grad = candidate, new_value, new_grad
    return x, max_iter, bool(np.max(np.abs(grad)) <= tol)


def fit_logistic(
    vectors: npt.NDArray[np.floating],
    labels: list[str],
    *,
    C: float = DEFAULT_C,
    class_weight: ClassWeight = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
) -> LinearHead:
    """Fit a logistic-regression head on ``vectors`` ``[n, dim]`` with ``labels`` (n names).

    Labels are sorted (scikit-learn's ``classes_`` order). ``C`` is the inverse
    regularisation strength, as in scikit-learn.

    Raises:
        InvalidArgumentError: fewer than two distinct labels, a shape mismatch, a
            non-finite vector, or a bad ``C`` / ``class_weight`` / ``tol`` / ``max_iter``.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(labels) or x.shape[0] == 0:
        raise InvalidArgumentError(
            f"vectors must be [n, dim] with one row per label; got shape {x.shape} and "
            f"{len(labels)} labels"
        )
    if not np.all(np.isfinite(x)):
        raise InvalidArgumentError("vectors hold NaN or infinite values")
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not 0 < C < float("inf"):
        raise InvalidArgumentError(f"C must be a finite number > 0, got {C!r}")
    if not tol > 0:
        raise InvalidArgumentError(f"tol must be > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise InvalidArgumentError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    names = tuple(sorted(set(labels)))
    if len(names) < 2:
        raise InvalidArgumentError(
            f"a classifier needs at least two different labels, got {list(names)}"
        )
    index = {name: i for i, name in enumerate(names)}
    y = np.array([index[label] for label in labels], dtype=np.intp)
    s = sample_weights(y, names, class_weight)
    alpha = 1.0 / (C * s.sum())
    d = x.shape[1]
    if len(names) == 2:
        params, iterations, converged = lbfgs(
            _binomial(x, y, s, alpha), np.zeros(d + 1), tol, max_iter
        )
        weight = np.vstack([np.zeros(d), params[:-1]])
        bias = np.array([0.0, params[-1]])
    else:
        k = len(names)
        f = _multinomial(x, y, s, alpha, k)
        params, iterations, converged = lbfgs(f, np.zeros(k * d + k), tol, max_iter)
        weight = params[: k * d].reshape(k, d)
        bias = params[k * d :]
    return LinearHead(weight, bias, names, iterations, converged)
