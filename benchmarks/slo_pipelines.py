"""The synthetic pipelines of benchmarks/slo.py (sleeps and spins, so they run anywhere; numpy
only). Importable from flowkit's venv (flows) and from .venv-peers (``floor``: the same stages
as one function, for Ray Serve in slo_ray.py).

- ``cascade``: a 0.5 ms CPU step, a batching model (4 ms + 0.4 ms per row), a high-variance
  remote call (lognormal, ~3 ms median, capped at 50 ms), a tiny post step.
- ``recommender``: a CPU-light step (0.3 ms) choosing the user's shard, a dynamic lookup of the
  shard (``dep.put``), the user's vector and item category from it, a dynamic lookup of the
  category's item matrix, then a small batching top-k (1 ms + 0.2 ms per row, plus the scores).
- ``scorer``: a 0.3 ms CPU step, a CPU-bound batching model (6 ms + 0.5 ms per row, spun), a
  high-variance remote call (lognormal, ~2 ms median, capped at 40 ms). Its model keeps one
  worker busy enough that a x3 rate step needs a second one, and its remote call is worth racing
  once there is: the case for a plan with room to race (``planner.with_room``).
- ``fetcher``: a 0.3 ms CPU step, a blocking call to a remote feature service (~9 ms, lognormal,
  capped at 40 ms: it holds the worker's one thread while it waits, as a synchronous client
  does, but not a core), a 0.2 ms CPU step. One worker serves about 100 requests a second, so a
  x3 step from 25 to 75 req/s needs a second worker, and two workers need little CPU: the case
  for a scale-out on a 2-core machine, where the scorer's steps either stayed on one worker or
  went past what the cores hold.
"""

from __future__ import annotations

import random
import time

import numpy as np

SHARDS, PER_SHARD, DIM, CATEGORIES, ITEMS = 4, 256, 16, 8, 200


def spin(seconds: float) -> None:
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        pass


# -- cascade ------------------------------------------------------------------------------------
def prep(row):
    spin(0.0005)
    return row["x"] + 1


def model(table):
    time.sleep(0.004 + 0.0004 * len(table))
    return [r["y"] * 2 for r in table]


def remote(row):
    time.sleep(min(0.05, random.lognormvariate(np.log(0.003), 0.7)))
    return row["m"] - 1


def post(row):
    return row["t"]


def cascade():
    import flowkit as fk

    f = fk.Flow("slo_cascade", {"x": int})
    f.map(prep, names=["y"]).map(model, names=["m"], batching=True) \
        .map(remote, names=["t"], high_variance=True).map(post, names=["z"])
    return f


def cascade_request(i: int) -> dict:
    return {"x": [i % 1000]}


# -- recommender --------------------------------------------------------------------------------
def route(row):
    spin(0.0003)
    return row["user"], f"users-{row['user'] % SHARDS}"


def user_vector(row):
    vec = row["shard_value"][(row["user"] // SHARDS) % PER_SHARD]
    return vec, f"items-{(row['user'] * 7) % CATEGORIES}"


def topk(table):
    time.sleep(0.001 + 0.0002 * len(table))
    out = []
    for r in table:
        scores = r["category_value"] @ r["vec"]
        out.append(",".join(map(str, np.argsort(-scores)[:5].tolist())))
    return out


def recommender():
    import flowkit as fk

    f = fk.Flow("slo_recommender", {"user": int})
    users = f.map(route, names=["user", "shard"]).lookup("shard", dynamic=True)
    items = users.map(user_vector, names=["vec", "category"]).lookup("category", dynamic=True)
    items.map(topk, names=["top5"], batching=True)
    return f


def recommender_store() -> dict:
    rng = np.random.default_rng(0)
    objs = {f"users-{s}": rng.standard_normal((PER_SHARD, DIM)).astype(np.float32) for s in range(SHARDS)}
    objs.update({f"items-{c}": rng.standard_normal((ITEMS, DIM)).astype(np.float32) for c in range(CATEGORIES)})
    return objs


def recommender_request(i: int) -> dict:
    return {"user": [(i * 7919) % (SHARDS * PER_SHARD)]}


# -- scorer -------------------------------------------------------------------------------------
def features(row):
    spin(0.0003)
    return row["x"] * 3


def rank(table):
    spin(0.006 + 0.0005 * len(table))
    return [r["f"] % 97 for r in table]


def enrich(row):
    time.sleep(min(0.04, random.lognormvariate(np.log(0.002), 0.9)))
    return row["r"] + 1


def scorer():
    import flowkit as fk

    f = fk.Flow("slo_scorer", {"x": int})
    f.map(features, names=["f"]).map(rank, names=["r"], batching=True) \
        .map(enrich, names=["e"], high_variance=True)
    return f


# -- fetcher ------------------------------------------------------------------------------------
def parse(row):
    spin(0.0003)
    return row["x"] % 512


def fetch_features(row):
    time.sleep(min(0.04, random.lognormvariate(np.log(0.009), 0.25)))
    return float(row["key"]) * 0.5


def score(row):
    spin(0.0002)
    return row["feat"] > 100


def fetcher():
    import flowkit as fk

    f = fk.Flow("slo_fetcher", {"x": int})
    f.map(parse, names=["key"]).map(fetch_features, names=["feat"]).map(score, names=["hit"])
    return f


# -- the registry -------------------------------------------------------------------------------
PIPELINES = {
    "cascade": {"flow": cascade, "request": cascade_request, "store": dict},
    "recommender": {"flow": recommender, "request": recommender_request, "store": recommender_store},
    "scorer": {"flow": scorer, "request": cascade_request, "store": dict},
    "fetcher": {"flow": fetcher, "request": cascade_request, "store": dict},
}


def sample(name: str, n: int = 8) -> dict:
    """Profiling input: ``n`` requests as one table's columns."""
    rows = [PIPELINES[name]["request"](i) for i in range(n)]
    return {k: [r[k][0] for r in rows] for k in rows[0]}


def floor(name: str, row: dict, store: dict) -> dict:
    """The pipeline's stages as one plain function over one row (Ray Serve's replica runs this)."""
    if name == "scorer":
        return {"e": enrich({"r": rank([{"f": features(row)}])[0]})}
    if name == "fetcher":
        return {"hit": score({"feat": fetch_features({"key": parse(row)})})}
    if name == "cascade":
        y = prep(row)
        m = model([{"y": y}])[0]
        return {"z": post({"t": remote({"m": m})})}
    _, shard = route(row)
    vec, cat = user_vector({"user": row["user"], "shard_value": store[shard]})
    return {"top5": topk([{"vec": vec, "category_value": store[cat]}])[0]}


def floor_batch(name: str, rows: list[dict], store: dict) -> list[dict]:
    """As ``floor`` with the batching stage run once over ``rows`` (Ray Serve's @serve.batch)."""
    if name == "scorer":
        return [{"e": enrich({"r": r})} for r in rank([{"f": features(row)} for row in rows])]
    if name == "fetcher":   # (nothing batches)
        return [floor(name, row, store) for row in rows]
    if name == "cascade":
        ms = model([{"y": prep(r)} for r in rows])
        return [{"z": post({"t": remote({"m": m})})} for m in ms]
    pairs = [user_vector({"user": r["user"], "shard_value": store[route(r)[1]]}) for r in rows]
    return [{"top5": t} for t in topk([{"vec": v, "category_value": store[c]} for v, c in pairs])]
