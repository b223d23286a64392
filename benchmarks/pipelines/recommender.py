"""Recommender: dynamic lookups of a user's vector and of a category's item matrix -> scoring ->
top-5. Scaled to fit this machine: 8,000 users x 128-d in 8 shards; 50 categories x 1,000 x 128
(Cloudflow: 100,000 users x 512-d; 1,000 categories x 2,500 x 512)."""

from __future__ import annotations

import numpy as np

USERS, SHARD, DIM, CATEGORIES, ITEMS = 8000, 1000, 128, 50, 1000
TARGET_MS = 50.0
RULES: dict = {}


def route(row) -> tuple[int, str, str]:
    return row["user"], row["recent"], f"users-{row['user'] // SHARD}"


def user_vector(row) -> tuple[np.ndarray, str]:
    vec = row["shard_value"][row["user"] % SHARD]
    category = sum(int(i) for i in row["recent"].split(",")) % CATEGORIES
    return vec, f"category-{category}"


def top5(row) -> str:
    scores = row["category_value"] @ row["vec"]
    best = np.argsort(-scores)[:5]
    return ",".join(map(str, best.tolist()))


def flow():
    import flowkit as fk

    f = fk.Flow("recommender", {"user": int, "recent": str})
    users = f.map(route, names=["user", "recent", "shard"]).lookup("shard", dynamic=True)
    items = users.map(user_vector, names=["vec", "category"]).lookup("category", dynamic=True)
    items.map(top5, names=["top5"])
    return f


def store() -> dict:
    rng = np.random.default_rng(0)
    objs = {f"users-{s}": rng.standard_normal((SHARD, DIM)).astype(np.float32) for s in range(USERS // SHARD)}
    objs.update({f"category-{c}": rng.standard_normal((ITEMS, DIM)).astype(np.float32) for c in range(CATEGORIES)})
    return objs


def requests(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"user": int(rng.integers(0, USERS)), "recent": ",".join(map(str, rng.integers(0, 10_000, 5)))}
            for _ in range(n)]


def floor(row: dict, store: dict) -> dict:
    user, recent, shard = route(row)
    vec, category = user_vector({"user": user, "recent": recent, "shard_value": store[shard]})
    return {"top5": top5({"vec": vec, "category_value": store[category]})}


def d_user(row, shard):
    return user_vector({"user": row["user"], "recent": row["recent"], "shard_value": shard})


def d_score(uv, items):
    return {"top5": top5({"vec": uv[0], "category_value": items})}


def dask_pipeline(client, row, stored):
    shard = stored[f"users-{row['user'] // SHARD}"]
    category = sum(int(i) for i in row["recent"].split(",")) % CATEGORIES
    uv = client.submit(d_user, row, shard, pure=False)
    return client.submit(d_score, uv, stored[f"category-{category}"], pure=False)


# -- the lookups as Ray Serve deployments hold them (benchmarks/peers/servers.py, the Ray graph) -----------
class _RayUsers:
    """The user shards: a request's user vector and category."""

    def __init__(self, store: dict):
        self.store = store

    def __call__(self, row):
        user, recent, shard = route(row)
        return user_vector({"user": user, "recent": recent, "shard_value": self.store[shard]})


class _RayItems:
    """The categories' item matrices: a user vector's top 5 in its category."""

    def __init__(self, store: dict):
        self.store = store

    def __call__(self, row) -> str:
        return top5({"vec": row["vec"], "category_value": self.store[row["category"]]})
