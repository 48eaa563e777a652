"""An HTML report of one run, made from the session journal.

Motion trace, per-volume and per-trial latency histograms, beta readiness (seconds from onset to
the first beta), retrieval accuracy, and a gallery of reconstructions beside the images that were
shown, each one's decoded caption (when captions are on) and thumbnails of the top retrieved candidates (the
shown one framed). Given the bundle's
model (``live``), also the live figures: single-trial retrieval at the first beta, after
refinements and at the run's end, scored from the journaled beta maps. Plots and images are
PNGs embedded in the page, so the report is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rtdecoder_client.messages import message_from_map

from rtdecoder.session.journal import read_records


def write_report(
    session_dir: str | Path,
    run: str,
    out_path: str | Path,
    tr_s: float,
    seen_image: Callable[[str], np.ndarray | None] | None = None,
    max_gallery: int = 24,
    candidate_image: Callable[[str], np.ndarray | None] | None = None,
    thumbnails_per_trial: int = 5,
    thumbnail_px: int = 64,
    live: Any | None = None,
    slow_after_onset_s: float | None = 29.5,
) -> dict[str, Any]:
    """Write ``out_path`` (HTML) for one run of a session; returns the figures it shows.

    Parameters
    ----------
    session_dir : Path
        The session folder holding the journal.
    run : str
        Run label.
    out_path : Path
        Where to write the page.
    tr_s : float
        Repetition time, s (beta readiness is the released volume's time minus the onset).
    seen_image : callable, optional
        ``seen_image(stim_id)`` returns the shown image (uint8 H×W×3) for the gallery.
    max_gallery : int, default=24
        Reconstructions shown.
    candidate_image : callable, optional
        ``candidate_image(candidate_id)`` returns a retrieval candidate's image (uint8 H×W×3) or
        ``None``, for the thumbnails of each trial's top retrieved candidates (e.g.
        :func:`rtdecoder.view.images.folder_image_source` of ``candidates.images_dir``). Default:
        ``seen_image`` (the shown images are usually among the candidates). Without either, the
        gallery lists the candidate ids.
    thumbnails_per_trial : int, default=5
        Retrieved candidates shown per trial (at most the session's ``retrieval_top_k``).
    thumbnail_px : int, default=64
        Edge of each candidate thumbnail, pixels.
    live : LiveScorer, optional
        The bundle's model with the shown images' tokens
        (:class:`rtdecoder.calibration.evaluate.LiveScorer`): the journaled beta maps are scored
        for the live figures (``figures["live"]``): single-trial retrieval at the first beta
        ("fast"), after refinements ("slow") and at the run's end, among the run's images and
        among the scorer's test set (:func:`rtdecoder.calibration.evaluate.live_figures`). The
        decode messages cannot give them: they rank among the decoder's candidates, only their
        top ones, and only for the betas decoded (first betas, unless ``session.decode_updates``
        / ``decode_final``).
    slow_after_onset_s : float or None, default=29.5
        "slow" is each trial's latest beta at most this long after onset (``None``: its last
        refinement).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(Path(session_dir) / "journal.bin")
    messages = [message_from_map(r["message"]) for r in records if r["kind"] == "published"]
    messages = [m for m in messages if m.data.get("run") == run]
    volumes = [m for m in messages if m.topic == "volume"]
    firsts = [m for m in messages if m.topic == "beta" and not m.data["is_update"] and not m.data["is_final"]]
    decodes = [m for m in messages if m.topic == "decode"]

    present = [m for m in volumes if not m.data["missing"]]
    volume_ms = np.array([1000 * (m.t["processed"] - m.t["file_complete"]) for m in present])
    trial_ms = np.array([
        1000 * (m.t["published"] - m.t["file_complete"]) for m in decodes if m.t.get("file_complete")
    ])
    readiness_s = np.array([_ready_s(m, tr_s) for m in firsts])
    hits = [m.data["stim_id"] in m.data["retrieval"]["ids"][:1] for m in decodes if m.data.get("stim_id")]
    hits5 = [m.data["stim_id"] in m.data["retrieval"]["ids"][:5] for m in decodes if m.data.get("stim_id")]
    # A handful of trials among thousands of candidates rarely gives a top-1 hit even from a good
    # decoder; the shown image's rank says how far above chance the ranking is.
    ranks = np.array([m.data["retrieval"]["shown_rank"] for m in decodes if "shown_rank" in m.data["retrieval"]])
    n_candidates = max((m.data["retrieval"].get("n_candidates", 0) for m in decodes), default=0)
    figures = {
        "volumes": len(present),
        "missing": len(volumes) - len(present),
        "trials": len(firsts),
        "decoded": len(decodes),
        "reconstructed": sum(m.data.get("reconstruction") == "done" for m in decodes),
        "captioned": sum(bool(m.data.get("caption")) for m in decodes),
        "caption_ms_median": _q(np.array([m.data["caption_ms"] for m in decodes if m.data.get("caption_ms")
                                          is not None]), 50),
        "volume_latency_ms_median": _q(volume_ms, 50),
        "volume_latency_ms_p95": _q(volume_ms, 95),
        "decode_latency_ms_median": _q(trial_ms, 50),
        "decode_latency_ms_p95": _q(trial_ms, 95),
        "retrieval_top1": float(np.mean(hits)) if hits else None,
        "retrieval_top5": float(np.mean(hits5)) if hits5 else None,
        "retrieval_candidates": n_candidates or None,
        "retrieval_chance_top1": 1.0 / n_candidates if n_candidates else None,
        "shown_rank_median": _q(ranks, 50),
        "shown_rank_chance_median": (n_candidates + 1) / 2 if n_candidates else None,
    }
    if live is not None:
        figures["live"] = _live_figures(messages, tr_s, live, slow_after_onset_s)

    plots = []
    fd = [m.data["fd_mm"] for m in present]
    motion = np.array([m.data["motion"] for m in present]) if present else np.zeros((0, 6))
    fig, axes = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
    index = [m.data["tr_index"] for m in present]
    if len(motion):
        for k, label in enumerate(("x mm", "y mm", "z mm")):
            axes[0].plot(index, motion[:, k], label=label)
        axes[0].legend(fontsize=7, ncol=3)
    axes[0].set_ylabel("translation (mm)")
    axes[1].plot(index, fd, color="k")
    axes[1].set_ylabel("FD (mm)")
    axes[1].set_xlabel("volume")
    plots.append(("Head motion", _png(fig)))
    for title, values, unit in (
        ("Per-volume latency: file complete to betas updated", volume_ms, "ms"),
        ("Per-trial latency: file complete to decode published", trial_ms, "ms"),
        ("Beta readiness: onset to first beta", readiness_s, "s"),
    ):
        fig, ax = plt.subplots(figsize=(6, 2.8))
        if len(values):
            # rounded: values equal but for float noise (a readiness of 6.4 s computed two ways) leave
            # numpy no room for 30 bins and it raises; equal values get its default one-unit range
            ax.hist(np.round(values, 6), bins=30, color="#4477aa")
            ax.axvline(np.median(values), color="k", linestyle="--", label=f"median {np.median(values):.1f} {unit}")
            ax.legend(fontsize=8)
        ax.set_xlabel(unit)
        plots.append((title, _png(fig)))

    gallery = []
    thumbnails = _Thumbnails(candidate_image or seen_image, thumbnail_px)
    for m in decodes[:max_gallery]:
        shown = seen_image(m.data["stim_id"]) if seen_image and m.data.get("stim_id") else None
        gallery.append((
            m.data["trial_id"], m.data.get("stim_id"), _img_tag(shown),
            _img_tag_png(m.data.get("image_png")) or html.escape(str(m.data.get("reconstruction"))),
            html.escape(str(m.data.get("caption") or "-")),
            _retrieved(m.data, thumbnails, thumbnails_per_trial),
        ))
    Path(out_path).write_text(_page(run, figures, plots, gallery))
    return figures


class _Thumbnails:
    """Candidate thumbnails as ``<img>`` tags, each candidate encoded once however often it is retrieved."""

    def __init__(self, source: Callable[[str], np.ndarray | None] | None, size_px: int) -> None:
        self.source = source
        self.size_px = size_px
        self._tags: dict[str, str] = {}

    def tag(self, candidate_id: str, title: str) -> str:
        if self.source is None:
            return ""
        if candidate_id not in self._tags:
            from rtdecoder.view.images import thumbnail_png

            try:
                image = self.source(candidate_id)
            except Exception:  # e.g. an id the bank does not know: the id is listed without a picture
                image = None
            self._tags[candidate_id] = "" if image is None else base64.b64encode(
                thumbnail_png(image, self.size_px)).decode("ascii")
        data = self._tags[candidate_id]
        if not data:
            return ""
        return (f'<img width="{self.size_px}" height="{self.size_px}" title="{html.escape(title)}" '
                f'src="data:image/png;base64,{data}">')


def _retrieved(data: dict[str, Any], thumbnails: _Thumbnails, n: int) -> str:
    """The top-``n`` retrieved candidates of one decode: thumbnail, rank, id and score; the shown one framed."""
    retrieval = data.get("retrieval") or {}
    ids, scores = list(retrieval.get("ids") or [])[:n], list(retrieval.get("scores") or [])
    cells = []
    for rank, candidate in enumerate(ids, start=1):
        score = f"{scores[rank - 1]:.3f}" if rank <= len(scores) else "-"
        label = f"{rank}. {candidate} ({score})"
        hit = " hit" if candidate == data.get("stim_id") else ""
        cells.append(f'<figure class="cand{hit}">{thumbnails.tag(str(candidate), label)}'
                     f"<figcaption>{html.escape(label)}</figcaption></figure>")
    rank = retrieval.get("shown_rank")
    if rank is not None:
        cells.append(f'<p class="rank">shown image: rank {int(rank)} of {retrieval.get("n_candidates", "?")}</p>')
    return "".join(cells)


def _live_figures(messages: list[Any], tr_s: float, scorer: Any, slow_after_onset_s: float | None) -> dict[str, Any]:
    """Fast / slow / end-of-run retrieval of the run's journaled beta maps, scored with the bundle's model."""
    from rtdecoder.calibration.evaluate import STAGES, LiveBeta, collect_stages, live_figures

    betas = [LiveBeta.from_message(m.data, tr_s) for m in messages if m.topic == "beta"]
    if not any(b.beta is not None for b in betas):
        return {stage: {"n_trials": 0, "note": "no beta maps journaled (session.publish_beta_maps: false)"}
                for stage in STAGES}
    selector = collect_stages(betas, slow_after_onset_s)
    figures = live_figures(selector.stages(), scorer)
    if not selector.n_updates:  # the first beta would stand in for every trial's "slow"
        figures["slow"] = {"n_trials": 0, "note": "no refinements journaled (glm.publish_refinements: false)"}
    return figures


def _ready_s(message: Any, tr_s: float) -> float:
    # Frame time of the volume the beta came from, minus the trial's onset.
    return message.data["tr_index"] * tr_s - message.data["onset_s"]


def _q(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img_tag(image: np.ndarray | None) -> str:
    if image is None:
        return ""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).resize((128, 128)).save(buffer, format="PNG")
    return _img_tag_png(buffer.getvalue())


def _img_tag_png(png: bytes | None) -> str:
    if not png:
        return ""
    return f'<img width="128" height="128" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def format_figure(value: Any) -> str:
    """One figure as text: floats to three significant digits, never in exponent notation."""
    if value is None:
        return "-"
    if isinstance(value, float):
        # a p95 of 1,412 ms, not 1.41e+03
        return f"{value:,.1f}".removesuffix(".0") if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def format_figures(figures: Mapping[str, Any]) -> str:
    """The figures of :func:`write_report` as text, one per line, then the live table."""
    from rtdecoder.calibration.evaluate import format_live_table

    lines = [f"{key:36s} {format_figure(value)}" for key, value in figures.items() if key != "live"]
    if figures.get("live"):
        lines.append(format_live_table(figures["live"]))
    return "\n".join(lines)


def _live_table(live: dict[str, Any] | None) -> str:
    """The live figures as an HTML table: a row per stage, image / brain top-1 and top-5 per pool."""
    if not live:
        return ""
    from rtdecoder.calibration.evaluate import live_pool_labels

    keys = ("image_top1", "image_top5", "brain_top1", "brain_top5")
    head = "".join(f"<th>{pool} {k.replace('_', ' ')}</th>" for pool in ("run", "test set") for k in keys)
    rows = []
    for stage, entry in live.items():
        if not entry.get("n_trials"):
            rows.append(f"<tr><td>{html.escape(stage)}</td><td colspan='10'>{html.escape(entry.get('note', ''))}"
                        "</td></tr>")
            continue
        cells = "".join(
            f"<td>{100 * entry[pool][k]:.1f}%</td>" if k in entry.get(pool, {}) else "<td>-</td>"
            for pool in ("run", "test_set") for k in keys
        )
        rows.append(f"<tr><td>{html.escape(stage)}</td><td>{entry['after_onset_s_median']:.1f} s</td>"
                    f"<td>{entry['n_trials']}</td>{cells}</tr>")
    pools = "; ".join(live_pool_labels(live))
    return (f"<h2>Live figures (single trials; {html.escape(pools)})</h2><table><tr><th>stage</th>"
            f"<th>after onset</th><th>trials</th>{head}</tr>{''.join(rows)}</table>")


def _page(run: str, figures: dict[str, Any], plots: list[tuple[str, str]], gallery: list[tuple]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(format_figure(v))}</td></tr>"
                   for k, v in figures.items() if k != "live")
    plot_html = "".join(
        f'<h3>{html.escape(t)}</h3><img src="data:image/png;base64,{data}">' for t, data in plots
    )
    cells = "".join(
        f"<tr><td>{html.escape(tid)}</td><td>{html.escape(str(sid))}</td><td>{seen}</td><td>{rec}</td>"
        f"<td class='caption'>{caption}</td><td>{top}</td></tr>"
        for tid, sid, seen, rec, caption, top in gallery
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>rtdecoder run {html.escape(run)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:4px 8px;vertical-align:middle}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}"
        "figure.cand{display:inline-block;margin:2px 4px;text-align:center;font-size:11px;max-width:90px}"
        "figure.cand img{border:2px solid transparent}figure.cand.hit img{border-color:#2a2}"
        "figure.cand.hit figcaption{color:#2a2;font-weight:bold}figcaption{overflow-wrap:anywhere}"
        "p.rank{margin:2px 4px;font-size:12px}td.caption{max-width:220px;font-style:italic}</style></head><body>"
        f"<h1>rtdecoder: {html.escape(run)}</h1><h2>Figures</h2><table>{rows}</table>{_live_table(figures.get('live'))}"
        f"<h2>Plots</h2>{plot_html}"
        "<h2>Reconstructions</h2><table><tr><th>trial</th><th>stimulus</th><th>seen</th>"
        "<th>reconstruction</th><th>caption (decoded)</th>"
        f"<th>retrieved (top candidates, cosine score)</th></tr>{cells}</table></body></html>"
    )
