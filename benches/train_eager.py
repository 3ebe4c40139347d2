"""PyTorch eager reference of twotower's training step (issue #14: Rust must train >= 1.5x faster).

The same model, batches, loss and optimizer as `twotower bench train` / `twotower train`, written
the way a competent person would write them in plain PyTorch eager, so the two can be timed
against each other on the same libtorch at the same thread count. What is mirrored, and from where:

- config: a pipeline TOML's `[train]` / `[train.tower]` (or a bare training-settings file), over
  the defaults of crates/trainer/src/config.rs and crates/towers/src/config.rs; `--set` overrides.
- data: a `twotower prepare` directory (crates/features: vocab/*.json, items.parquet,
  splits/train.parquet), tokenized as features/src/tokenizer.rs does, histories cut to the last
  `history_len` events (towers/src/dataset.rs, inputs.rs).
- batches (trainer/src/batches.rs): shuffled chunks of `batch_size`; every distinct item of the
  batch (targets, history items, extra negatives) runs the item tower once and the user tower
  gathers its history rows from those vectors; histories right-padded to the batch's longest;
  logQ from training-target frequency; uniform extra negatives; built on a background thread with
  a queue of 4, like the Rust prefetch.
- model (towers/src/{layers,item,user,model}.rs): masked-mean embedding bags, MLP (linear, layer
  norm, ReLU or GELU, dropout), GRU over [item vector | event type | time gap], GRU state + mean +
  most recent content + hour/weekday + user features, unit vectors, fixed or learned temperature.
  Parameter names and shapes equal the Rust safetensors keys; initialisation follows tch's.
- step (trainer/src/{loss,session,optim}.rs): in-batch softmax with logQ, accidental-hit masking,
  torch.optim.AdamW (decay off for `.bias`, `.norm*`, `log_temperature`), global-norm clipping.
  `--mode bench` steps at the constant `lr` like `bench train`; `--mode train` uses the warm-up +
  cosine schedule of `twotower train` and reports per-epoch mean losses like train_log.jsonl.
"""
import argparse, json, math, queue, sys, threading, time, tomllib
from pathlib import Path

import numpy as np, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq, torch
import torch.nn as nn, torch.nn.functional as F

TOWER = dict(dim=64, token_dim=64, aspect_dim=32, category_dim=32, item_id_dim=0, item_id_dropout=0.5,
             hashed_word_dropout=0.0,
             item_hidden=[256], gru_hidden=128, event_type_dim=16, gap_dim=16, context_dim=8,
             user_feature_dim=16, user_hidden=[256], activation="relu", dropout=0.1, layer_norm=True,
             temperature=0.05, learn_temperature=True, max_title_tokens=16, max_aspects=16,
             max_categories=8, max_query_tokens=8, max_user_features=8, history_len=50, vocab={})
TRAIN = dict(epochs=20, batch_size=256, lr=2e-3, weight_decay=1e-4, warmup_steps=200, final_lr_ratio=0.05,
             grad_clip=1.0, logq_correction=True, remove_accidental_hits=True, remove_seen_negatives=False,
             extra_negatives=0, patience=3,
             eval_batch_size=512, mixed_precision=False, seed=42)
EVENT_TYPES = ["view", "search", "add_to_cart", "watch", "purchase", "rate"]  # code = index + 1
GAP_BUCKETS, M64 = 16, (1 << 64) - 1


def load_config(path, overrides):
    table = tomllib.loads(Path(path).read_text()) if path else {}
    table = table.get("train", table)
    cfg = {**TRAIN, **{k: v for k, v in table.items() if k != "tower"}}
    cfg["tower"] = {**TOWER, **table.get("tower", {})}
    for kv in overrides:  # key=value (TOML value), tower fields as tower.key
        key, value = kv.split("=", 1)
        key = key.removeprefix("train.")
        table = cfg["tower"] if key.startswith("tower.") else cfg
        table[key.removeprefix("tower.")] = tomllib.loads(f"v = {value}")["v"]
    for d, ref in ((cfg, TRAIN), (cfg["tower"], TOWER)):
        unknown = set(d) - set(ref) - {"tower"}
        assert not unknown, f"unknown settings {unknown}"
    return cfg


def stable_hash(s):  # FNV-1a 64 + SplitMix64 finalizer (features/src/tokenizer.rs)
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & M64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & M64
    return h ^ (h >> 31)


class Vocab:
    def __init__(self, path):
        v = json.loads(path.read_text()) if path.exists() else {"tokens": [], "hash_buckets": 1}
        self.index = {t: i + 1 for i, t in enumerate(v["tokens"])}
        self.buckets, self.size = v["hash_buckets"], 1 + len(v["tokens"]) + v["hash_buckets"]

    def id(self, token):
        return self.index.get(token) or len(self.index) + 1 + stable_hash(token) % self.buckets


def words(text):
    return "".join(c if c.isalnum() else " " for c in text).lower().split()


def padded(rows, width):
    out = np.zeros((len(rows), width), np.int64)
    for r, row in enumerate(rows):
        out[r, : min(len(row), width)] = row[:width]
    return out


class Data:
    """The tokenized catalog and the training examples as padded arrays (towers/src/dataset.rs)."""

    def __init__(self, d, t):
        d = Path(d)
        split = json.loads((d / "dataset.json").read_text())["settings"]["split"]
        v = {n: Vocab(d / "vocab" / f"{n}.json") for n in ["title", "aspects", "categories", "user_features", "item_ids"]}
        t["vocab"] = {n: x.size for n, x in v.items()}
        t["vocab"]["title_buckets"] = v["title"].buckets
        items = pq.read_table(d / "items.parquet").to_pylist()
        self.ids = np.array([i["item_id"] for i in items], np.uint64)
        self.title = padded([[v["title"].id(w) for w in words(i["title"])] for i in items], t["max_title_tokens"])
        self.aspects = padded([[v["aspects"].id(a.lower()) for a in i["aspects"]] for i in items], t["max_aspects"])
        self.cats = padded([[v["categories"].id(c.lower()) for c in i["categories"]] for i in items], t["max_categories"])
        self.item_id = np.array([v["item_ids"].index.get(str(i["item_id"]), 0) for i in items], np.int64)
        cold = lambda i: split["cold_items"] > 0 and stable_hash(f"{split['seed']}:{i}") / M64 < split["cold_items"]
        self.pool = np.array([r for r, i in enumerate(items) if not cold(i["item_id"])], np.int64)
        order = np.argsort(self.ids)
        row_of = lambda ids: order[np.minimum(np.searchsorted(self.ids, ids, sorter=order), len(order) - 1)]

        ex = pq.read_table(d / "splits" / "train.parquet")
        n, H = ex.num_rows, t["history_len"]
        self.n = n
        self.target = row_of(ex["target_item_id"].to_numpy())
        assert (self.ids[self.target] == ex["target_item_id"].to_numpy()).all(), "a target is not in items.parquet"
        self.hour = ex["hour"].to_numpy().astype(np.int64) % 24
        self.weekday = ex["weekday"].to_numpy().astype(np.int64) % 7
        features = ex["user_features"].to_pylist()
        self.user_features = padded([[v["user_features"].id(f.lower()) for f in fs] for fs in features], t["max_user_features"])
        # Histories: keep the last H events, oldest first, right-padded; -1 = no item / no query.
        h = ex["history"].combine_chunks()
        off, ev = h.offsets.to_numpy(), h.values
        counts = np.diff(off)
        self.hist_len = np.minimum(counts, H).astype(np.int64)
        e = np.repeat(np.arange(n), counts)
        pos = np.arange(off[0], off[-1]) - np.repeat(off[1:] - self.hist_len, counts)
        keep = pos >= 0
        e, pos = e[keep], pos[keep]
        ev = ev.take(np.flatnonzero(keep) + off[0])
        etype = pc.index_in(ev.field("event_type"), value_set=pa.array(EVENT_TYPES)).to_numpy() + 1
        item = ev.field("item_id")
        has = item.is_valid().to_numpy(zero_copy_only=False)
        rows = row_of(item.fill_null(0).to_numpy())
        has &= self.ids[rows] == item.fill_null(0).to_numpy()  # not in the catalog: a type-only event
        minutes = np.maximum(ev.field("gap_s").to_numpy(), 0) // 60
        gap = 1 + np.minimum(np.floor(np.log2(1.0 + minutes)).astype(np.int64), GAP_BUCKETS - 2)
        self.hist_row, self.hist_type, self.hist_gap = (np.full((n, H), f, np.int64) for f in (-1, 0, 0))
        self.hist_row[e, pos] = np.where(has, rows, -1)
        self.hist_type[e, pos], self.hist_gap[e, pos] = etype, gap
        qs = ev.field("query").to_pylist()
        qi = [k for k, q in enumerate(qs) if q]
        self.queries = padded([[v["title"].id(w) for w in words(qs[k])] for k in qi], t["max_query_tokens"])
        self.hist_query = np.full((n, H), -1, np.int64)
        self.hist_query[e[qi], pos[qi]] = np.arange(len(qi))
        c = np.bincount(self.target, minlength=len(items))
        self.log_p = np.log(np.maximum(c, 1) / max(n, 1)).astype(np.float32)
        # What evaluation masks (towers/src/dataset.rs SeenItems::before): per user the catalog rows
        # of events.parquet in file order; an example sees its user's events ahead of its target's first.
        evs = pq.read_table(d / "events.parquet", columns=["user_id", "item_id"]).filter(pc.is_valid(pc.field("item_id")))
        eu, ei = evs["user_id"].to_numpy(), evs["item_id"].to_numpy()
        er = row_of(ei)
        inside = self.ids[er] == ei
        eu, er = eu[inside], er[inside]
        by_user = np.argsort(eu, kind="stable")  # file order within each user
        us, starts = np.unique(eu[by_user], return_index=True)
        self.user_rows = dict(zip(us, np.split(er[by_user], starts[1:])))
        first = lambda rows, t: int(hit[0]) if len(hit := np.flatnonzero(rows == t)) else 0
        self.example_user = ex["user_id"].to_numpy()
        self.seen_end = np.array([first(self.user_rows.get(u, er[:0]), t) for u, t in zip(self.example_user, self.target)],
                                 np.int64)


class Batches:
    """trainer/src/batches.rs: one epoch's shuffled batches, built on a background thread."""

    def __init__(self, data, cfg):
        self.d, self.b, self.extra, self.logq = data, cfg["batch_size"], cfg["extra_negatives"], cfg["logq_correction"]
        self.remove_seen = cfg["remove_seen_negatives"]
        self.build_seconds, self.built = 0.0, 0

    def per_epoch(self):
        n = self.d.n
        return max(n // self.b + (n % self.b >= 2), 1)

    def epoch(self, seed, epoch):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(self.d.n)
        chunks = [c for c in np.array_split(order, range(self.b, self.d.n, self.b)) if len(c) >= 2]
        q = queue.Queue(4)  # prefetch
        threading.Thread(target=lambda: [q.put(self.build(c, rng)) for c in chunks] + [q.put(None)], daemon=True).start()
        while (batch := q.get()) is not None:
            yield batch

    def build(self, idx, rng):
        start, d, B = time.perf_counter(), self.d, len(idx)
        L = int(d.hist_len[idx].max())
        hrow, real = d.hist_row[idx, :L], d.hist_row[idx, :L] >= 0
        neg = d.pool[rng.integers(len(d.pool), size=self.extra)] if len(d.pool) else d.pool[:0]
        uniq, inv = np.unique(np.concatenate([d.target[idx], hrow[real], neg]), return_inverse=True)
        hist_item = np.zeros((B, L), np.int64)
        hist_item[real] = inv[B : B + real.sum()]
        cand_rows = np.concatenate([d.target[idx], neg])
        log_q = np.concatenate([d.log_p[d.target[idx]] + np.float32(math.log(B)),
                                np.full(len(neg), math.log(max(self.extra, 1) / max(len(d.pool), 1)), np.float32)])
        hq = d.hist_query[idx, :L]
        query = None
        if (hq >= 0).any():
            query = torch.from_numpy(np.where((hq >= 0)[..., None], d.queries[np.maximum(hq, 0)], 0))
        T = torch.from_numpy
        candidates = np.concatenate([inv[:B], inv[len(inv) - len(neg):]])  # rows of the targets, then negatives
        seen = None
        if self.remove_seen:  # batches.rs seen_candidates: a user's earlier items are no negatives for it
            earlier = [d.user_rows[d.example_user[i]][: d.seen_end[i]] if d.seen_end[i] else d.pool[:0] for i in idx]
            n_items, lens = len(d.ids), np.array([len(e) for e in earlier])
            seen_keys = np.repeat(np.arange(B), lens) * n_items + np.concatenate(earlier)  # (row, item) pairs
            seen = np.isin(np.arange(B)[:, None] * n_items + cand_rows[None, :], seen_keys)
            seen[np.arange(B), np.arange(B)] = False
            seen = torch.from_numpy(seen)
        batch = dict(size=B, title=T(d.title[uniq]), aspects=T(d.aspects[uniq]), categories=T(d.cats[uniq]),
                     ids=T(d.item_id[uniq]), hist_item=T(hist_item), hist_is_item=T(real[..., None].astype(np.float32)),
                     hist_query=query, hist_type=T(d.hist_type[idx, :L]), hist_gap=T(d.hist_gap[idx, :L]),
                     hist_len=T(d.hist_len[idx]), hour=T(d.hour[idx]), weekday=T(d.weekday[idx]),
                     user_features=T(d.user_features[idx]), candidates=T(candidates), candidate_rows=T(cand_rows),
                     log_q=T(log_q if self.logq else np.zeros_like(log_q)), seen=seen)
        self.build_seconds += time.perf_counter() - start
        self.built += 1
        return batch


class Bag(nn.Embedding):
    """layers.rs EmbeddingBag: mean of the non-padding (id 0) rows; all padding gives zeros."""

    def __init__(self, rows, dim):
        super().__init__(rows, dim, padding_idx=0)
        nn.init.normal_(self.weight, 0.0, 0.1)

    def forward(self, ids):
        mask = (ids != 0).float().unsqueeze(-1)
        return (super().forward(ids) * mask).sum(-2) / mask.sum(-2).clamp_min(1.0)


class Mlp(nn.Module):
    def __init__(self, inp, hidden, out, t):
        super().__init__()
        self.p, self.layers, self.norms = t["dropout"], [], []
        self.act = {"relu": F.relu, "gelu": F.gelu}[t["activation"]]
        for i, w in enumerate(hidden + [out]):  # named linear0, norm0, ... like the Rust checkpoint keys
            self.layers.append(nn.Linear(inp, w))
            self.add_module(f"linear{i}", self.layers[-1])
            if i < len(hidden):
                self.norms.append(nn.LayerNorm(w) if t["layer_norm"] else nn.Identity())
                self.add_module(f"norm{i}", self.norms[-1])
            inp = w

    def forward(self, h):
        for linear, norm in zip(self.layers[:-1], self.norms):
            h = F.dropout(self.act(norm(linear(h))), self.p, self.training)
        return self.layers[-1](h)


class ItemTower(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.title_emb = Bag(t["vocab"]["title"], t["token_dim"])
        self.aspect_emb = Bag(t["vocab"]["aspects"], t["aspect_dim"])
        self.category_emb = Bag(t["vocab"]["categories"], t["category_dim"])
        if t["item_id_dim"] > 0:
            self.id_emb = nn.Embedding(t["vocab"]["item_ids"], t["item_id_dim"])
            nn.init.normal_(self.id_emb.weight, 0.0, 0.1)
        self.id_dropout = t["item_id_dropout"]
        self.hashed_dropout = t["hashed_word_dropout"]
        self.first_bucket = t["vocab"]["title"] - t["vocab"]["title_buckets"]
        inp = t["token_dim"] + t["aspect_dim"] + t["category_dim"] + t["item_id_dim"]
        self.mlp = Mlp(inp, t["item_hidden"], t["dim"], t)

    def forward(self, b):
        title = b["title"]
        if self.hashed_dropout > 0:  # hash-bucket words of unseen (and, in training, dropped) items
            hide = b["ids"] <= 0
            if self.training:
                hide |= torch.rand(b["ids"].shape) < self.hashed_dropout
            title = title.masked_fill((title >= self.first_bucket) & hide.unsqueeze(-1), 0)
        parts = [self.title_emb(title), self.aspect_emb(b["aspects"]), self.category_emb(b["categories"])]
        if hasattr(self, "id_emb"):
            keep = b["ids"] > 0
            if self.training and self.id_dropout > 0:
                keep &= torch.rand(b["ids"].shape) >= self.id_dropout
            parts.append(self.id_emb(b["ids"]) * keep.float().unsqueeze(-1))
        return F.normalize(self.mlp(torch.cat(parts, -1)), dim=-1)


class UserTower(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.dim, self.hidden = t["dim"], t["gru_hidden"]
        self.query_proj = nn.Linear(t["token_dim"], t["dim"])
        self.event_type_emb = nn.Embedding(len(EVENT_TYPES) + 1, t["event_type_dim"])
        self.gap_emb = nn.Embedding(GAP_BUCKETS, t["gap_dim"])
        self.gru = nn.GRU(t["dim"] + t["event_type_dim"] + t["gap_dim"], t["gru_hidden"], batch_first=True)
        self.hour_emb, self.weekday_emb = nn.Embedding(24, t["context_dim"]), nn.Embedding(7, t["context_dim"])
        self.user_feature_emb = Bag(t["vocab"]["user_features"], t["user_feature_dim"])
        inp = t["gru_hidden"] + 2 * t["dim"] + 2 * t["context_dim"] + t["user_feature_dim"]
        self.mlp = Mlp(inp, t["user_hidden"], t["dim"], t)

    def forward(self, b, item_vecs, title_emb):
        B, L = b["hist_type"].shape
        if L == 0:
            state = torch.zeros(B, self.hidden + 2 * self.dim)
        else:
            content = item_vecs.index_select(0, b["hist_item"].flatten()).view(B, L, self.dim) * b["hist_is_item"]
            if b["hist_query"] is not None:  # searches: the projected mean of the query's words
                content = content + (1.0 - b["hist_is_item"]) * self.query_proj(title_emb(b["hist_query"]))
            x = torch.cat([content, self.event_type_emb(b["hist_type"]), self.gap_emb(b["hist_gap"])], -1)
            out, _ = self.gru(x)
            last = (b["hist_len"] - 1).clamp_min(0).view(B, 1, 1)
            at_last = lambda t: t.gather(1, last.expand(B, 1, t.shape[-1])).squeeze(1)
            real = (torch.arange(L).unsqueeze(0) < b["hist_len"].unsqueeze(1)).float().unsqueeze(-1)
            mean = (content * real).sum(1) / b["hist_len"].clamp_min(1).float().unsqueeze(-1)
            has = (b["hist_len"] > 0).float().unsqueeze(-1)
            state = torch.cat([at_last(out), mean, at_last(content)], -1) * has
        ctx = [state, self.hour_emb(b["hour"]), self.weekday_emb(b["weekday"]), self.user_feature_emb(b["user_features"])]
        return F.normalize(self.mlp(torch.cat(ctx, -1)), dim=-1)


class TwoTower(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.item, self.user = ItemTower(t), UserTower(t)
        log_t = torch.tensor(math.log(t["temperature"]))
        if t["learn_temperature"]:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        for m in self.modules():  # tch's initialisation: Kaiming-uniform (ReLU gain) weights, zero GRU biases
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.GRU):
                for name, p in m.named_parameters():
                    nn.init.kaiming_uniform_(p, nonlinearity="relu") if "weight" in name else nn.init.zeros_(p)

    def loss(self, b, remove_hits):
        item_vecs = self.item(b)
        user_vecs = self.user(b, item_vecs, self.item.title_emb)
        candidates = item_vecs.index_select(0, b["candidates"])
        temperature = self.log_temperature.exp().clamp(0.01, 1.0)
        logits = user_vecs @ candidates.T / temperature - b["log_q"].unsqueeze(0)
        B, C = logits.shape
        if remove_hits:  # another row's positive that is this row's item is no negative
            same = b["candidate_rows"][:B].unsqueeze(1) == b["candidate_rows"].unsqueeze(0)
            logits = logits.masked_fill(same & ~torch.eye(B, C, dtype=torch.bool), -1e9)
        if b["seen"] is not None:
            logits = logits.masked_fill(b["seen"], -1e9)
        return F.cross_entropy(logits, torch.arange(B))


def learning_rate(step, warmup, total, peak, final_ratio):  # trainer/src/optim.rs
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    floor = peak * final_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a `twotower prepare` directory")
    ap.add_argument("--config", help="pipeline TOML ([train], [train.tower]) or training-settings TOML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. tower.gru_hidden=64")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--mode", choices=["bench", "train"], default="bench")
    ap.add_argument("--steps", type=int, default=100, help="bench: timed steps")
    ap.add_argument("--warmup", type=int, default=10, help="bench: untimed steps first")
    ap.add_argument("--epochs", type=int, help="train: epochs (default: the config's)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: libtorch's)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="bench: then profile N steps (table on stderr)")
    ap.add_argument("--out", help="also write the JSON report here")
    a = ap.parse_args()
    cfg = load_config(a.config, a.set)
    cfg["batch_size"] = a.batch_size or cfg["batch_size"]
    epochs = a.epochs or cfg["epochs"]
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    data = Data(a.data, cfg["tower"])
    load_s = time.perf_counter() - t0
    torch.manual_seed(cfg["seed"])
    model = TwoTower(cfg["tower"]).train()
    named = dict(model.named_parameters())
    no_decay = lambda n: n.endswith(".bias") or ".norm" in n or n == "log_temperature"
    groups = [{"params": [p for n, p in named.items() if not no_decay(n)], "weight_decay": cfg["weight_decay"]},
              {"params": [p for n, p in named.items() if no_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
    batches = Batches(data, cfg)

    def step(b, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        loss = model.loss(b, cfg["remove_accidental_hits"])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        return loss.detach()

    report = dict(impl="pytorch-eager", torch=torch.__version__, threads=torch.get_num_threads(),
                  batch_size=cfg["batch_size"], extra_negatives=cfg["extra_negatives"],
                  history_len=cfg["tower"]["history_len"], train_examples=data.n, load_seconds=load_s,
                  parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  tensors={k: "x".join(map(str, v.shape)) for k, v in model.state_dict().items()})
    if a.mode == "bench":  # trainer/src/bench.rs: constant lr, `warmup` untimed steps, then `steps` timed
        done, examples, unique, history, losses, epoch = 0, 0, 0, 0, [], 0
        start = time.perf_counter()
        while done < a.warmup + a.steps:
            for b in batches.epoch(cfg["seed"], epoch):
                loss = step(b, cfg["lr"])
                done += 1
                if done == a.warmup:
                    start = time.perf_counter()
                if done > a.warmup:
                    examples += b["size"]
                    unique += len(b["ids"])
                    history += int(b["hist_len"].sum())
                    losses.append(loss)
                if done == a.warmup + a.steps:
                    break
            epoch += 1
        seconds = time.perf_counter() - start
        report.update(steps=a.steps, warmup=a.warmup, seconds=seconds, examples_per_sec=examples / seconds,
                      unique_items_per_batch=unique / a.steps, history_per_example=history / examples,
                      loss_first=float(losses[0]), loss_last=float(losses[-1]))
        if a.profile:  # where the time goes, by ATen op (the same kernels the Rust step calls)
            with torch.profiler.profile() as prof:
                for _, b in zip(range(a.profile), batches.epoch(cfg["seed"], epoch + 1)):
                    step(b, cfg["lr"])
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40), file=sys.stderr)
    else:  # trainer/src/session.rs: warm-up + cosine over all epochs, per-epoch mean loss
        total, log, done = batches.per_epoch() * epochs, [], 0
        for epoch in range(epochs):
            start, losses, examples = time.perf_counter(), [], 0
            for b in batches.epoch(cfg["seed"], epoch):
                lr = learning_rate(done, cfg["warmup_steps"], total, cfg["lr"], cfg["final_lr_ratio"])
                losses.append(step(b, lr))
                done += 1
                examples += b["size"]
                if len(losses) % 50 == 0:
                    print(f"epoch {epoch + 1} step {len(losses)} loss {float(torch.stack(losses).mean()):.4f}", file=sys.stderr)
            seconds = time.perf_counter() - start
            log.append(dict(epoch=epoch + 1, train_loss=float(torch.stack(losses).mean()), lr=lr, steps=len(losses),
                            first_step_loss=float(losses[0]), last_step_loss=float(losses[-1]),
                            examples_per_sec=examples / seconds, seconds=seconds))
            print(json.dumps(log[-1]), file=sys.stderr)
        report.update(epochs=log)
    report["host_batch_ms"] = 1e3 * batches.build_seconds / max(batches.built, 1)
    text = json.dumps(report, indent=2)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
