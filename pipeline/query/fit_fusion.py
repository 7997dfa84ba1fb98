"""``catalog-index fit-fusion``: train the attention module of ``attention`` fusion on labelled pairs.

Training pairs are labelled queries (``--queries``, the eval format) and,
unless ``--no_titles``, one generated pair per item that has both a title and
a description: the title alone as a text query for its own item (the seed
documents' matching model learns from labelled query-item pairs; titles are
the honest labels a catalog carries). Pairs are split deterministically by a
hash of the query into train and held-out; the module is trained with a
softmax over all catalog items (an InfoNCE loss) and the held-out split
reports recall/MRR/nDCG of weighted average (``mean``), the parameter-free
agreement rule and the learned module, side by side.

The item modality vectors are re-encoded in this process with the run's own
models (the embeddings files hold fused vectors only), so this suits
catalogs up to some hundred thousand items; the query vectors come from the
same :class:`pipeline.query.encoder.QueryEncoder` the ``search`` verb uses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import time
import typing

import numpy as np
import torch

from encoders import attention, towers
from encoders.fusion import FusionConfig, Layout, fuse, modality_means
from encoders.media import FetchPolicy, MediaError, load_image, resolve_uri
from pipeline.query import metrics
from pipeline.query.evaluate import LabelledQuery, read_queries
from pipeline.query.encoder import QueryEncoder, QueryError, RunInfo, load_run
from pipeline.storage import match_paths, read_table
from schemas.catalog import CatalogColumns, CatalogItem, InvalidRow, validate_row
from schemas.manifest import Catalog

_LOG = logging.getLogger("catalog_index.fit_fusion")
TEMPERATURE = 0.05  # softmax temperature of the training loss (cosines live in [-1, 1])


@dataclasses.dataclass
class ItemVectors:
    ids: list[str]
    nested: list[dict]  # per item {space: {modality: [vectors]}}, for encoders.fusion.fuse
    x: dict[str, torch.Tensor]  # space -> [N, M, d] unit modality vectors (module spec order)
    mask: dict[str, torch.Tensor]  # space -> [N, M] bool
    counts: dict[str, int]


def read_catalog(pattern: str, columns: CatalogColumns = CatalogColumns()
                 ) -> tuple[list[CatalogItem], dict[str, int]]:
    """Validated items of a catalog (first row wins on duplicate ids), and what was left out.

    ``columns``: the physical column names, as the run recorded them
    (``Manifest.catalog.column_mapping()``), so a run made with
    ``--item_id_column`` etc. is read as the pipeline read it.
    """
    items, seen, counts = [], set(), {"invalid_row": 0, "duplicate_id": 0}
    for path in match_paths(pattern):
        rows = read_table(path).to_pylist()
        for n, row in enumerate(rows):
            try:
                item = validate_row(row, columns, base_uri=posixpath.dirname(path), source=f"{path}#{n}")
            except InvalidRow:
                counts["invalid_row"] += 1
                continue
            if item.item_id in seen:
                counts["duplicate_id"] += 1
                continue
            seen.add(item.item_id)
            items.append(item)
    return items, counts


def run_catalog(run: RunInfo, pattern: str = "") -> tuple[list[CatalogItem], dict[str, int]]:
    """The run's catalog (or ``pattern``, another snapshot of it) read with the column mapping the run recorded."""
    catalog = run.manifest.catalog or Catalog()
    if not (pattern or catalog.path):
        raise ValueError(f"run {run.run_dir} records no catalog path: give --catalog")
    return read_catalog(pattern or catalog.path, catalog.column_mapping())


def encode_items(run: RunInfo, items: list[CatalogItem], module: attention.FusionAttention,
                 encoder: QueryEncoder) -> ItemVectors:
    """Every item's modality vectors through the run's towers (images preprocessed as the pipeline does)."""
    nested: list[dict] = [{} for _ in items]
    counts = {"media_failed": 0}
    for modality, space in run.routes:
        spec = run.spec(space)
        model = towers.load(spec, encoder.device)
        if modality == "text":
            idx = [i for i, it in enumerate(items) if it.text]
            vecs = model.encode_text([items[i].text for i in idx], encoder.batch_size) if idx else []
            for i, v in zip(idx, vecs):
                nested[i].setdefault(space, {})[modality] = [v]
        elif modality == "image":
            pre = towers.image_preprocess(spec)
            owners, pixels = [], []
            for i, it in enumerate(items):
                for uri in it.image_uris:
                    try:
                        pixels.append(load_image(resolve_uri(uri, it.base_uri), FetchPolicy(), pre)[0])
                        owners.append(i)
                    except MediaError:
                        counts["media_failed"] += 1
            vecs = model.encode_image(np.stack(pixels), encoder.batch_size) if pixels else []
            for i, v in zip(owners, vecs):
                nested[i].setdefault(space, {}).setdefault(modality, []).append(v)
    keep = [i for i, n in enumerate(nested) if n]
    counts["no_vectors"] = len(items) - len(keep)
    nested = [nested[i] for i in keep]
    ids = [items[i].item_id for i in keep]
    x, mask = {}, {}
    layout = _layout(run)
    for space, modalities, dim in module.spec:
        x[space] = torch.zeros((len(ids), len(modalities), dim), dtype=torch.float64)
        mask[space] = torch.zeros((len(ids), len(modalities)), dtype=torch.bool)
    for n, vectors in enumerate(nested):
        for space, per_modality in modality_means(vectors, layout).items():
            names = typing.cast(attention.SpaceAttention, module.spaces[space]).modalities
            for modality, v in per_modality.items():
                j = names.index(modality)
                x[space][n, j] = torch.from_numpy(v)
                mask[space][n, j] = True
    return ItemVectors(ids, nested, x, mask, counts)


def _layout(run: RunInfo) -> Layout:
    """The one-block-per-space layout attention fusion uses for this run's routes."""
    dims = {space: run.layout.space_dim(space) for space in run.layout.spaces}
    return Layout.build(run.routes, dims, FusionConfig(mode="attention"))


def _config(run: RunInfo, mode: str) -> FusionConfig:
    base = run.fusion
    return FusionConfig(mode=mode, modality_weights=base.modality_weights, space_weights=base.space_weights)


def title_pairs(items: list[CatalogItem]) -> list[LabelledQuery]:
    return [LabelledQuery("text", it.title, (it.item_id,), 0) for it in items if it.title and it.description]


def held_out(query: LabelledQuery, fraction: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}|{query.modality}|{query.query}".encode()).digest()
    return int.from_bytes(h[:4], "little") / 2**32 < fraction


def query_vectors(run: RunInfo, encoder: QueryEncoder, pairs: list[LabelledQuery],
                  ids: list[str]) -> tuple[np.ndarray, list[LabelledQuery], dict[str, int]]:
    """Fused query vectors (attention layout) of the pairs this run can encode and whose items it has."""
    layout, config = _layout(run), _config(run, "attention")
    known = set(ids)
    keep, vectors, skipped = [], [], {"no_encoder": 0, "relevant_not_in_catalog": 0}
    for modality in dict.fromkeys(p.modality for p in pairs):
        group = [p for p in pairs if p.modality == modality and set(p.relevant) & known]
        skipped["relevant_not_in_catalog"] += sum(1 for p in pairs if p.modality == modality
                                                  and not set(p.relevant) & known)
        try:
            per_query = encoder.space_vectors(modality, [p.query for p in group]) if group else []
        except QueryError:
            skipped["no_encoder"] += len(group)
            continue
        for p, v in zip(group, per_query):
            keep.append(p)
            vectors.append(fuse(v, layout, config, query=True))
    dim = layout.dim
    return (np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)), keep, skipped


def train(module: attention.FusionAttention, items: ItemVectors, queries: np.ndarray, targets: list[list[int]],
          config: FusionConfig, epochs: int, lr: float, weight_decay: float, seed: int) -> list[float]:
    """Full-batch InfoNCE over all items: -log sum_{relevant} softmax(q . item / T)."""
    torch.manual_seed(seed)
    module.double().train()
    q = torch.from_numpy(queries.astype(np.float64))
    target = torch.zeros((len(queries), len(items.ids)), dtype=torch.bool)
    for row, cols in enumerate(targets):
        target[row, cols] = True
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(epochs):
        fused = attention.fuse_batch(module, items.x, items.mask, config)
        logits = q @ fused.T / TEMPERATURE
        loss = -(torch.logsumexp(logits.masked_fill(~target, float("-inf")), 1) - torch.logsumexp(logits, 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    module.float().eval()
    return losses


def rank_metrics(item_matrix: np.ndarray, ids: list[str], queries: np.ndarray,
                 pairs: list[LabelledQuery]) -> dict:
    from pipeline.query.search import ExactSearcher

    if not len(pairs):
        return {"overall": {"queries": 0}, "by_modality": {}}
    _, ranked = ExactSearcher(ids, item_matrix).search(queries, 100)
    return metrics.summarize([(p.modality, metrics.query_metrics(r, p.relevant)) for p, r in zip(pairs, ranked)])


def fit(run: RunInfo, pairs: list[LabelledQuery], items: list[CatalogItem], *, holdout: float = 0.3,
        epochs: int = 200, lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0,
        device: str = "cpu") -> tuple[attention.FusionAttention, dict]:
    """Trains the module and returns it with a report comparing it to ``mean`` and ``agreement`` on held-out pairs."""
    started = time.perf_counter()
    encoder = QueryEncoder(run, device=device)
    module = attention.FusionAttention.for_run(run.routes, _layout(run))
    vectors = encode_items(run, items, module, encoder)
    qv, kept, skipped = query_vectors(run, encoder, pairs, vectors.ids)
    position = {item: i for i, item in enumerate(vectors.ids)}
    test = np.array([held_out(p, holdout, seed) for p in kept], bool)
    train_rows = np.flatnonzero(~test)
    if not len(train_rows):
        raise ValueError(f"no training pairs left (of {len(pairs)}; skipped {skipped}); add --queries or titles")
    targets = [[position[r] for r in kept[i].relevant if r in position] for i in train_rows]
    attention_config = _config(run, "attention")
    losses = train(module, vectors, qv[train_rows], targets, attention_config, epochs, lr, weight_decay, seed)

    layout = _layout(run)
    learned = module.weights_fn()
    matrices = {
        "mean": np.stack([fuse(v, layout, _config(run, "mean")) for v in vectors.nested]),
        "attention_agreement": np.stack([fuse(v, layout, attention_config) for v in vectors.nested]),
        "attention_learned": np.stack([fuse(v, layout, attention_config, attention=learned) for v in vectors.nested]),
    }
    test_pairs = [kept[i] for i in np.flatnonzero(test)]
    train_pairs = [kept[i] for i in train_rows]
    report = {
        "run_id": run.manifest.run_id,
        "items": len(vectors.ids), "item_counts": vectors.counts,
        "pairs": {"train": len(train_pairs), "held_out": len(test_pairs), "skipped": skipped,
                  "held_out_fraction": holdout, "seed": seed},
        "training": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "temperature": TEMPERATURE,
                     "loss_first": losses[0], "loss_last": losses[-1],
                     "seconds": round(time.perf_counter() - started, 2)},
        "held_out": {name: rank_metrics(m, vectors.ids, qv[test], test_pairs) for name, m in matrices.items()},
        "train": {name: rank_metrics(m, vectors.ids, qv[train_rows], train_pairs) for name, m in matrices.items()},
    }
    return module, report


def format_report(report: dict) -> str:
    cols = ["recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"]
    p = report["pairs"]
    lines = [f"run {report['run_id']}: {report['items']} items, {p['train']} training pairs, "
             f"{p['held_out']} held out (skipped {p['skipped']})",
             f"loss {report['training']['loss_first']:.4f} -> {report['training']['loss_last']:.4f} "
             f"in {report['training']['epochs']} epochs",
             f"held-out {'':14s} " + " ".join(f"{c:>9s}" for c in cols)]
    for name, m in report["held_out"].items():
        o = m["overall"]
        if o.get("queries"):
            lines.append(f"  {name:22s} " + " ".join(f"{o[c]:9.3f}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from pipeline.console import Parser, UsageError, add_verbosity_args

    parser = Parser(
        prog="catalog-index fit-fusion",
        description="Train the attention-fusion module on labelled query-item pairs of a run's catalog; "
                    "save it (safetensors) for `catalog-index run --fusion_mode attention --fusion_module`.")
    parser.add_argument("--run", required=True, help="a run folder OUT/runs/<id>, or OUT (follows LATEST)")
    parser.add_argument("--queries", action="append", default=[], help="labelled queries (eval format); repeatable")
    parser.add_argument("--no_titles", action="store_true", help="do not generate title -> item pairs")
    parser.add_argument("--catalog", default="", help="catalog path or glob (default: the run's)")
    parser.add_argument("--out", default="", help="module path (default OUT/fusion/attention-<run_id>.safetensors)")
    parser.add_argument("--holdout", type=float, default=0.3, help="fraction of pairs held out for the report")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    add_verbosity_args(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.holdout < 1:
        parser.error(f"--holdout must be in [0, 1), got {args.holdout}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    try:
        run = load_run(args.run)
        items, read_counts = run_catalog(run, args.catalog)
        pairs = [q for path in args.queries for q in read_queries(path)]
        if not args.no_titles:
            pairs += title_pairs(items)
        module, report = fit(run, pairs, items, holdout=args.holdout, epochs=args.epochs, lr=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed, device=args.device)
    except (QueryError, ValueError, OSError) as e:  # a run not found, unreadable catalog or queries file
        raise UsageError(str(e), "catalog-index fit-fusion --help lists the options") from None
    report["catalog_rows_left_out"] = read_counts
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(run.run_dir)), "fusion",
                                   f"attention-{run.manifest.run_id}.safetensors")
    attention.save(module, out)
    report["module"] = os.path.abspath(out)
    with open(out + ".report.json", "w") as f:
        json.dump(report, f, indent=2)
    print(format_report(report))
    print(f"module: {out}  (report: {out}.report.json)\n"
          f"use: catalog-index run ... --fusion_mode attention --fusion_module {out}")
    return 0

