"""The ``edgemm`` command line: export, quantize, bench, info, classify, caption, embed, index, eval, serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.errors import EdgemmError, InputError
from edgemm.runtime.image import IMAGE_SUFFIXES

EXPORT_STEPS = {"default": 6, "audio-visual": 9, "matching": 8, "clip": 6, "captioner": 7}  # progress steps of each builder
FROM_FOLDER = ("clip", "captioner")  # exports that take a user's folder with --from (captioner: optional)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _load(args: argparse.Namespace, default: str = "default", *, captioner: bool = False):
    """The bundle (or built-in model) a command runs on; a captioner for ``caption``, an embedding model otherwise."""
    from edgemm._caption import Captioner
    from edgemm._model import load

    engines = None
    if args.backend == "tensorrt" or "tensorrt" in args.providers.split(","):
        from edgemm.runtime.engines import EngineOptions

        engines = EngineOptions(precision=args.engine_precision, quiet=args.quiet)
    model = load(args.bundle, default=default, backend=args.backend, providers=tuple(args.providers.split(",")),
                 threads=args.threads, engines=engines)
    if isinstance(model, Captioner) != captioner:
        family = model.manifest.family
        raise InputError(f"bundle '{args.bundle}' is a {family} bundle; 'edgemm {args.command}' needs "
                         + ("a captioner bundle (edgemm export captioner)." if captioner else
                            "an embedding bundle (a dual encoder, fusion or audio-visual model). For captions use "
                            "'edgemm caption' or 'edgemm eval --captioner'."))
    return model


def _image_paths(items: list[str]) -> list[Path]:
    """Expand directories into their image files (sorted); keep files as given."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise InputError(f"directory '{p}' holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            paths.extend(found)
        elif not p.exists():
            raise InputError(f"image file '{p}' does not exist.")
        else:
            paths.append(p)
    return paths


def _labels(args: argparse.Namespace) -> list[str] | None:
    if args.labels_file:
        path = Path(args.labels_file)
        if not path.is_file():
            raise InputError(f"labels file '{path}' does not exist.")
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: Notepad's byte-order mark is not part of a label
        except UnicodeDecodeError as e:
            raise InputError(f"labels file '{path}' is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                             "save it as UTF-8.") from None
        except OSError as e:
            raise InputError(f"cannot read labels file '{path}': {e.strerror}.") from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    return args.labels


def _check_text_args(args: argparse.Namespace) -> None:
    """Refuse texts that held non-UTF-8 bytes on the command line (Python turns each into a lone surrogate)."""
    for name in ("labels", "texts", "text", "prompt", "question"):
        value = getattr(args, name, None)
        for text in [value] if isinstance(value, str) else value or []:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"{name[:-1] if name.endswith('s') else name} {text!r} holds bytes that are not "
                                 "UTF-8; pass UTF-8 text (check the encoding of the terminal or script).") from None


def _check_folder(path: Path, what: str) -> None:
    """Fail before the work rather than after it when an output's folder is missing."""
    if not path.parent.is_dir():
        raise InputError(f"cannot write {what} '{path}': folder '{path.parent}' does not exist; create it first.")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def cmd_export_triton(args: argparse.Namespace) -> int:
    from edgemm._triton_repo import TritonOptions, export_triton
    from edgemm.runtime.engines import EngineOptions

    if args.bundle is None:
        raise InputError("'edgemm export triton' needs the bundle: edgemm export triton BUNDLE -o REPO.")
    options = TritonOptions(target=args.target, graph_backend=args.graph_backend, max_batch=args.max_batch,
                            max_delay_ms=args.max_delay_ms, instances=args.instances, fp16=not args.no_fp16,
                            fp16_text=args.fp16_text, workspace_gb=args.workspace_gb, engine_cache=args.engine_cache,
                            site_packages=args.site_packages,
                            engines=EngineOptions(quiet=args.quiet) if args.engines else None)
    names = export_triton(args.bundle, args.output, options, overwrite=args.force)
    if args.quiet:
        print(args.output)
    else:
        print(f"wrote Triton model repository {args.output}: {', '.join(names)}")
        print(f"  tritonserver --model-repository {Path(args.output).absolute()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.model == "triton":
        return cmd_export_triton(args)
    if args.bundle is not None:
        raise InputError(f"'edgemm export {args.model}' takes no bundle argument (only 'edgemm export triton' does).")
    if args.model == "clip" and args.source is None:
        raise InputError("'edgemm export clip' needs --from FOLDER (a local Hugging Face CLIP/SigLIP folder).")
    if args.model not in FROM_FOLDER and args.source is not None:
        raise InputError(f"'edgemm export {args.model}' builds a built-in model and takes no --from; use "
                         "'edgemm export clip --from DIR' or 'edgemm export captioner --from DIR' for your own.")
    import importlib

    from tqdm import tqdm

    from edgemm._model import DEFAULT_MODELS

    steps = tqdm(total=EXPORT_STEPS[args.model], desc=f"export {args.model}", unit="step", disable=args.quiet)

    def progress(message: str) -> None:
        steps.set_postfix_str(message)
        steps.update(1)

    if args.model == "captioner" and args.source is not None:
        from edgemm.export.models.captioner import build_captioner_bundle
        from edgemm.export.models.hf_captioner import CaptionCheckpoint

        progress(f"loading {args.source}")
        parts = CaptionCheckpoint(args.source).parts(args.name)
        manifest = build_captioner_bundle(parts, args.output, overwrite=args.force, progress=progress)
    elif args.model in DEFAULT_MODELS:
        module, builder = DEFAULT_MODELS[args.model]
        build = getattr(importlib.import_module(module), builder)
        manifest = build(args.output, overwrite=args.force, progress=progress)
    else:
        from edgemm.export.models.clip import build_clip_bundle

        manifest = build_clip_bundle(args.source, args.output, name=args.name, overwrite=args.force, progress=progress)
    steps.close()
    for role, report in manifest.verification.items():
        if "max_abs_diff" in report:
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in report["max_abs_diff"].items())
            print(f"verified {role}: max abs diff {diffs} (tolerance {report['tolerance']:g}) on {report['inputs']}")
    checks = manifest.verification
    if "generation" in checks:
        print(_generation_summary(checks["generation"]))
    if "tokenizer" in checks:
        print(f"verified tokenizer: identical ids to the folder's tokenizer on {checks['tokenizer']['texts']} texts")
    if "preprocessing" in checks and "embedding_cosine_mean" in checks["preprocessing"]:
        pre = checks["preprocessing"]
        print(f"preprocessing vs the folder's image processor: embedding cosine mean "
              f"{pre['embedding_cosine_mean']:.4f}, min {pre['embedding_cosine_min']:.4f} on {pre['images']} photos")
    elif "preprocessing" in checks:
        pre = checks["preprocessing"]
        print(f"preprocessing vs the folder's image processor: memory cosine min {pre['memory_cosine_min']:.4f}, "
              f"same greedy caption on {pre['same_greedy_caption']} of {pre['images']} photos")
    print(f"wrote {args.output}")
    return 0


def _generation_summary(report: dict[str, Any]) -> str:
    modes = [m for m in ("greedy", "beam", "prompted") if m in report]
    parts = [f"{m}{' ' + str(report[m]['settings']['num_beams']) + ' beams' if m == 'beam' else ''} "
             f"{report[m]['identical_tokens']}/{report[m]['of']}" for m in modes]
    logits = report["logits"]["max_abs_diff"]
    return (f"verified generation: identical token ids to {report['compared_to']} on {report['images']} photos "
            f"({', '.join(parts)}); logits max abs diff first step {logits['first_step']:.1e}, cached steps "
            f"{logits['cached_steps']:.1e}")


def _calibration_paths(items: list[str] | None) -> tuple[Path | None, Path | None]:
    images = texts = None
    for item in items or []:
        p = Path(item)
        if p.is_dir():
            if images is not None:
                raise InputError(f"--calibration: two image folders ('{images}', '{p}'); give one.")
            images = p
        elif p.is_file():
            if texts is not None:
                raise InputError(f"--calibration: two text files ('{texts}', '{p}'); give one.")
            texts = p
        else:
            raise InputError(f"--calibration: '{p}' does not exist; give a folder of images or a text file.")
    return images, texts


def _caption_gate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-exact-match", type=float, default=0.75,
                   help="captioner gate: captions identical to the fp32 teacher's")
    p.add_argument("--min-token-agreement", type=float, default=0.85,
                   help="captioner gate: the teacher's tokens reproduced at their position")
    p.add_argument("--min-similarity", type=float, default=0.95,
                   help="captioner gate: text-tower cosine between the two captions (when the default bundle is built)")


def _caption_gate(args: argparse.Namespace) -> tuple[Any, Any]:
    """The caption gate's thresholds, and the default text tower to embed captions with (None when not built)."""
    from edgemm._caption_gate import CaptionGateThresholds
    from edgemm._model import default_bundle_dir, load

    thresholds = CaptionGateThresholds(exact_match=args.min_exact_match, token_agreement=args.min_token_agreement,
                                       mean_similarity=args.min_similarity)
    text_model = load(threads=args.threads) if (default_bundle_dir() / "manifest.json").is_file() else None
    return thresholds, text_model


def cmd_quantize_captioner(args: argparse.Namespace) -> int:
    from edgemm._caption_gate import caption_gate_summary
    from edgemm._quantize_caption import quantize_captioner

    if args.calibration or args.dynamic or args.all_matmuls:
        raise InputError("a captioner quantizes dynamically (no calibration data): drop --calibration, --dynamic "
                         "and --all-matmuls.")
    thresholds, text_model = _caption_gate(args)  # the default text tower embeds the captions
    bar, progress = _quantize_progress(args)
    try:
        manifest, info = quantize_captioner(
            args.bundle_path, args.output, precision=args.precision,
            graphs=args.graphs.split(",") if args.graphs else None, thresholds=thresholds,
            recover=not args.no_recover, accept_degradation=args.accept_degradation, overwrite=args.force,
            threads=args.threads, text_model=text_model, progress=progress)
    finally:
        bar.close()
    kept = [role for role, p in info["graphs"].items() if p == "fp32"]
    return _print_quantized(args, manifest, info, [caption_gate_summary(info["gate"])]
                            + ([f"kept in float: {', '.join(kept)}"] if kept else []))


def _quantize_progress(args: argparse.Namespace) -> tuple[Any, Any]:
    """A progress bar for edgemm quantize, and the callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(desc=f"quantize {args.precision}", unit="step", disable=args.quiet)

    def progress(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(1)

    return bar, progress


def _print_quantized(args: argparse.Namespace, manifest: Any, info: dict[str, Any], lines: list[str]) -> int:
    """edgemm quantize's report: the gate's lines, notes, and what was written."""
    if args.json:
        _print_json(info)
        return 0
    for line in lines:
        print(line)
    if info.get("note"):
        print(f"note: {info['note']}")
    if info.get("accepted_degradation"):
        print("warning: the gate failed and --accept-degradation wrote the bundle anyway (recorded in its manifest)")
    print(f"wrote {args.output} ({manifest.precision}, {info['mode']}, {info['seconds']} s)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgemm._gate import GateThresholds, summary
    from edgemm._quantize import quantize_bundle
    from edgemm.export.quantize import Int8Options
    from edgemm.runtime.manifest import read_manifest

    if read_manifest(args.bundle_path).family == "captioner":
        return cmd_quantize_captioner(args)
    images, texts = _calibration_paths(args.calibration)
    options = Int8Options(activations=args.activations, method=args.calibrate_method,
                          matmul_weights_only=not args.all_matmuls)
    thresholds = GateThresholds(mean_cosine=args.min_mean_cosine, worst_cosine=args.min_worst_cosine,
                                top1_agreement=args.min_agreement)
    bar, progress = _quantize_progress(args)
    graphs = args.graphs.split(",") if args.graphs else None
    try:
        manifest, info = quantize_bundle(
            args.bundle_path, args.output, precision=args.precision, dynamic=args.dynamic, graphs=graphs,
            calibration_images=images, calibration_texts=texts, options=options, thresholds=thresholds,
            recover=not args.no_recover, accept_degradation=args.accept_degradation, overwrite=args.force,
            threads=args.threads, progress=progress)
    finally:
        bar.close()
    kept = [f"kept in float in {role}: {len(nodes)} node(s), costliest first: {', '.join(nodes[:4])}"
            f"{' …' if len(nodes) > 4 else ''}" for role, nodes in info["kept_in_float"].items() if nodes]
    return _print_quantized(args, manifest, info, [summary(info["gate"]), *kept])


def cmd_engine(args: argparse.Namespace) -> int:
    from edgemm._engines import ensure_engines, list_engines
    from edgemm.runtime.bundle import Bundle
    from edgemm.runtime.engines import EngineOptions, parse_axis_overrides, read_sidecar

    if args.action == "list":
        found = list_engines(Bundle(args.bundle_path), EngineOptions(directory=args.engine_dir))
        if args.json:
            _print_json(found)
            return 0
        print(_engine_lines(found) or f"{args.bundle_path}: no engines cached")
        return 0
    options = EngineOptions(precision=args.precision, axes=parse_axis_overrides(args.axis),
                            rebuild=not args.no_rebuild, directory=args.engine_dir, workspace_mib=args.workspace_mib,
                            images=args.images, device=args.device, quiet=args.quiet)
    bundle = Bundle(args.bundle_path)

    def progress(line: str) -> None:
        print(f"edgemm: {line}", file=sys.stderr, flush=True)

    engines = ensure_engines(bundle, options, progress=None if args.quiet else progress)
    records = {role: read_sidecar(plan.with_suffix(".json"))[1] for role, plan in engines.items()}
    if args.json:
        _print_json({role: {"plan": str(plan), **records[role]} for role, plan in engines.items()})
        return 0
    for role, plan in engines.items():
        print(f"{role}: {plan}")
    return 0


def _engine_lines(found: list[dict[str, Any]]) -> str:
    """``edgemm engine list`` / ``edgemm info``: one line per cached engine, with how it was verified."""
    lines = []
    for e in found:
        if "error" in e:
            lines.append(f"  {e['sidecar']}: unreadable ({e['error']})")
            continue
        k, v = e["key"], e.get("verification") or {}
        figures = "; ".join(
            f"{name} cosine {f['cosine_min']:.5f}, rel diff {f['relative_diff']:.2g}"
            + (f", top-1 {f['top1_agreement']:.1%}" if "top1_agreement" in f else "")
            for name, f in (v.get("outputs") or {}).items())
        state = ("" if e["present"] else " (plan missing)") + ("" if e["matches_bundle"] else " (stale: graph changed)")
        lines.append(f"  {k['role']} {k['precision']} for {k['gpu']} (sm {k['compute_capability']}, {k['tensorrt']})"
                     f"{state}: built in {e['build_seconds']} s; verified on {v.get('inputs', '?')}: {figures}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from edgemm.runtime.bundle import Bundle

    bundle = Bundle(args.bundle_path, check_hashes=not args.no_verify)
    m = bundle.manifest
    if args.json:
        _print_json(m.to_dict())
        return 0
    dim = f", dim {m.embedding_dim}" if m.embedding_dim is not None else ""
    print(f"{args.bundle_path}: {m.name} ({m.family}), schema {m.schema_version}, {m.precision}{dim}")
    for role, g in m.graphs.items():
        ins = ", ".join(f"{t.name}{t.shape}:{t.dtype}" for t in g.inputs)
        outs = ", ".join(f"{t.name}{t.shape}:{t.dtype}" for t in g.outputs)
        print(f"  {role}: {g.file}  in: {ins}  out: {outs}")
        if role in m.verification:
            v = m.verification[role]
            print(f"    verified: max abs diff {v['max_abs_diff']} (tol {v['tolerance']}) on {v['inputs']}")
    if m.image:
        print(f"  image: {m.image.size}px, crop {m.image.crop_fraction}, mean {m.image.mean}, std {m.image.std}, {m.image.color}")
    if m.text:
        print(f"  text: {m.text.tokenizer}, max {m.text.max_length} tokens")
    quant = m.verification.get("quantization")
    if quant and "exact_match" in quant["gate"]:  # a captioner's: gated on its captions
        gate = quant["gate"]
        floats = ", ".join(r for r, p in quant["graphs"].items() if p == "fp32") or "none"
        print(f"  quantized: {quant['mode']} {quant['precision']} from {m.source.get('quantized_from', {}).get('path')}; "
              f"gate {'passed' if gate['passed'] else 'FAILED (accepted)'} on {gate['images']} held-out images: exact "
              f"caption match {gate['exact_match']:.1%}, token agreement {gate['token_agreement']:.1%}, BLEU-4 "
              f"{gate['bleu4']:.3f}; graphs kept in float: {floats}")
    elif quant:
        gate = quant["gate"]
        kept = ", ".join(f"{role} {len(nodes)}" for role, nodes in quant["kept_in_float"].items() if nodes) or "none"
        print(f"  quantized: {quant['mode']} {quant['precision']} from {m.source.get('quantized_from', {}).get('path')}; "
              f"gate {'passed' if gate['passed'] else 'FAILED (accepted)'}: image cosine {gate['image_cosine']['mean']:.4f}"
              f"/{gate['image_cosine']['worst']:.4f}, text {gate['text_cosine']['mean']:.4f}/"
              f"{gate['text_cosine']['worst']:.4f}, top-1 agreement {gate['top1_agreement']:.1%}; "
              f"nodes kept in float: {kept}")
    distill = m.verification.get("distillation")
    if distill and distill["tower"] == "decoder":
        gate, speed = distill["gate"], distill["speed"]
        print(f"  distilled: decoder student keeping layers {distill['student']['kept']} of "
              f"{distill['student']['teacher_layers']} ({distill['teacher']}); gate "
              f"{'passed' if gate['passed'] else 'FAILED (accepted)'} on {gate['images']} held-out images: exact "
              f"caption match {gate['exact_match']:.1%}, token agreement {gate['token_agreement']:.1%}, BLEU-4 "
              f"{gate['bleu4']:.3f}; {speed['speedup']:.2f}x per caption")
        distill = None
    while distill:  # latest first; "earlier" holds the other tower's distillation
        cos, r, speed = distill["gate"][f"{distill['tower']}_cosine"], distill["retention"], distill["speed"]
        batch = f"batch {speed['batch']}" if distill["tower"] == "text" else "one frame"
        spec = ",".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                        for k, v in distill["student"].items() if v is not None)
        print(f"  distilled: {distill['tower']} student {spec} of {distill['teacher']}; gate "
              f"{'passed' if distill['passed'] else 'FAILED (accepted)'}: {distill['tower']} cosine {cos['mean']:.4f}"
              f"/{cos['worst']:.4f}, zero-shot top-1 {r['teacher_top1']:.1%} -> {r['student_top1']:.1%} "
              f"(retention {r['retention']:.1%}), {speed['speedup']:.2f}x at {batch}")
        distill = distill.get("earlier")
    if m.generation:
        g = m.generation
        settings = ", ".join(f"{k}={v}" for k, v in g.settings.items())
        print(f"  generation: {g.tokenizer}, start {g.start_ids}, end {g.eos_ids}, {g.max_positions} positions, "
              f"{'takes' if g.prompt else 'no'} prompt; defaults: {settings or 'transformers defaults'}")
        if "generation" in m.verification:
            print(f"  {_generation_summary(m.verification['generation'])}")
    from edgemm._engines import list_engines

    engines = _engine_lines(list_engines(bundle))
    if engines:
        print("  TensorRT engines:\n" + engines)
    scoring = f"scoring: {m.scoring.kind}; " if m.scoring else ""
    print(f"  {scoring}files: {len(m.files)} (sha256 checked: {not args.no_verify})")
    print(f"  made with: {', '.join(f'{k} {v}' for k, v in m.tools.items())}; created {m.created}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    model = _load(args)
    paths = _image_paths(args.images)
    results = model.classify([str(p) for p in paths], labels=_labels(args), top_k=args.top_k)
    if args.json:
        _print_json([{"image": str(p), "predictions": [{"label": r.label, "score": r.score} for r in preds]}
                     for p, preds in zip(paths, results)])
        return 0
    for p, preds in zip(paths, results):
        print(f"{p}: " + ", ".join(f"{r.label} {r.score:.3f}" for r in preds))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    model = _load(args, default="captioner", captioner=True)
    paths = _image_paths(args.images)
    if args.question is not None:
        if args.prompt is not None:
            raise InputError("--prompt continues a caption and --question asks one; give one of them.")
        captions = model.answer([str(p) for p in paths], args.question, max_new_tokens=args.max_new_tokens,
                                num_beams=args.beams)
    else:
        captions = model.caption([str(p) for p in paths], prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                 num_beams=args.beams)
    if args.json:
        _print_json([{"image": str(p), "caption": c.text, "token_ids": c.token_ids, "score": c.score}
                     for p, c in zip(paths, captions)])
        return 0
    for p, c in zip(paths, captions):
        print(f"{p}: {c.text}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edgemm._serve import InferenceServer

    engines = None
    if args.backend == "tensorrt" or "tensorrt" in args.providers.split(","):
        from edgemm.runtime.engines import EngineOptions

        engines = EngineOptions(precision=args.engine_precision, quiet=args.quiet)
    server = InferenceServer(args.bundle, default=args.default, host=args.host, port=args.port,
                             max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, workers=args.workers,
                             threads=args.threads, providers=tuple(args.providers.split(",")), backend=args.backend,
                             engines=engines, max_body_bytes=args.max_body_mb << 20, max_items=args.max_items,
                             verbose=args.verbose)
    print(f"edgemm: serving {server.bundle.path} at {server.url} (models: {', '.join(sorted(server.models))}); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("edgemm: stopping", file=sys.stderr)
    finally:
        server.close()
    return 0


def cmd_classify_av(args: argparse.Namespace) -> int:
    from edgemm._av import AudioVisual

    if not args.frames and not args.audio:
        raise InputError("give --frames, --audio or both.")
    model = _load(args, default="audio-visual")
    if not isinstance(model, AudioVisual):
        raise InputError(f"bundle '{model.bundle.path}' is a {model.manifest.family} bundle, not audio-visual; "
                         "build one with 'edgemm export audio-visual -o DIR'.")
    frames = [str(p) for p in _image_paths(args.frames)] if args.frames else None
    result = model.classify_av(frames, args.audio, labels=_labels(args), audio_weight=args.audio_weight,
                               pooling=args.pooling, top_k=args.top_k)
    if args.json:
        _print_json({"predictions": [vars(p) for p in result.predictions], "modalities": list(result.modalities),
                     "missing": list(result.missing), "audio_weight": result.audio_weight, "frames": result.frames,
                     "frame_weights": list(result.frame_weights), "audio_seconds": result.audio_seconds,
                     "scenes": [vars(p) for p in result.scenes]})
        return 0
    print(", ".join(f"{p.label} {p.score:.3f}" for p in result.predictions))
    used = " + ".join(result.modalities)
    missing = f"; no {' or '.join(result.missing)} given" if result.missing else ""
    print(f"from {used} (audio weight {result.audio_weight:.2f}, {result.frames} frames, "
          f"{result.audio_seconds:.1f} s of audio{missing})")
    if result.scenes:
        print("sounds like: " + ", ".join(f"{p.label} {p.score:.3f}" for p in result.scenes))
    return 0


def _matcher(model):
    from edgemm._fusion import FusionModel

    if not isinstance(model, FusionModel) or model.fusion.task != "matching":
        raise InputError(f"bundle '{model.bundle.path}' has no image-text matching head; use the built-in one "
                         "(leave out --bundle) or 'edgemm export matching -o DIR'.")
    return model


def cmd_match(args: argparse.Namespace) -> int:
    model = _matcher(_load(args, default="matching"))
    probs = np.atleast_1d(model.match(args.image, args.texts))
    threshold = model.fusion.threshold
    if args.json:
        _print_json({"image": args.image, "threshold": threshold,
                     "matches": [{"text": t, "probability": float(p), "match": bool(p >= threshold)}
                                 for t, p in zip(args.texts, probs)]})
        return 0
    for text, p in zip(args.texts, probs):
        print(f"{p:.3f}  {'match   ' if p >= threshold else 'no match'}  {text}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edgemm._distill import DistillThresholds, distill_bundle, distill_summary
    from edgemm.export.distill import DistillOptions
    from edgemm.export.distill_image import IMAGE_OPTIONS
    from edgemm.runtime.manifest import read_manifest

    if args.tower == "decoder" or read_manifest(args.bundle_path).family == "captioner":
        return cmd_distill_captioner(args)
    if args.synthetic is not None:
        raise InputError("--synthetic is for a captioner's decoder (--tower decoder); text and image students train "
                         "on --data or packaged data.")
    if args.tower == "image" and args.label_kl is not None:
        raise InputError("--label-kl trains text students; an image student learns the teacher's class "
                         "distribution already (the default model's Hinton KD).")
    options = replace(IMAGE_OPTIONS if args.tower == "image" else DistillOptions(), threads=args.threads,
                      seed=args.seed)
    changes = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                                 ("label_kl_weight", args.label_kl),
                                 ("max_steps", args.max_steps)) if v is not None}
    options = replace(options, **changes)
    bars, progress = _distill_progress(args, ("loss", "held_out_mean_cosine"))
    try:
        manifest, info = distill_bundle(
            args.bundle_path, args.output, tower=args.tower, student=args.student, data=args.data, options=options,
            thresholds=DistillThresholds(mean_cosine=args.min_mean_cosine, retention=args.min_retention,
                                         top1_agreement=args.min_agreement),
            accept_degradation=args.accept_degradation, checkpoint_dir=args.checkpoint, restart=args.restart,
            overwrite=args.force, threads=args.threads, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    return _print_distilled(args, info, distill_summary(info))


def _distill_progress(args: argparse.Namespace, shown: tuple[str, ...]) -> tuple[list[Any], Any]:
    """edgemm distill's progress: step lines on stderr, and a bar over the training steps (made at the first)."""
    from tqdm import tqdm

    bars: list[Any] = []

    def progress(stage: str, done: int, total: int, metrics: dict[str, Any]) -> None:
        if stage == "step":
            if not args.quiet:
                tqdm.write(metrics["message"], file=sys.stderr)
            return
        if not bars:
            bars.append(tqdm(total=total, desc="distilling", unit="step", disable=args.quiet, initial=done))
        bars[0].update(done - bars[0].n)
        values = {k: f"{v:.4f}" for k, v in metrics.items() if k in shown}
        if values:
            bars[0].set_postfix(values)

    return bars, progress


def _print_distilled(args: argparse.Namespace, info: dict[str, Any], text: str) -> int:
    if args.json:
        _print_json(info)
        return 0
    print(text)
    if info.get("accepted_degradation"):
        print("warning: the gate failed and --accept-degradation wrote the bundle anyway (recorded in its manifest)")
    print(f"wrote {args.output}")
    return 0


def cmd_distill_captioner(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edgemm._distill_caption import caption_distill_summary, distill_captioner
    from edgemm.export.distill_caption import CaptionDistillOptions

    if args.tower not in ("text", "decoder"):  # "text" is the flag's default
        raise InputError(f"a captioner distils its decoder: use --tower decoder, not --tower {args.tower}.")
    if args.synthetic is not None and args.synthetic < 0:
        raise InputError(f"--synthetic is a count of simulated inputs, 0 or more; got {args.synthetic}.")
    if args.label_kl is not None:
        raise InputError("--label-kl trains text students; a decoder student learns the teacher's token "
                         "distributions already (token-level KL).")
    changes = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                                 ("max_steps", args.max_steps)) if v is not None}
    options = replace(CaptionDistillOptions(threads=args.threads, seed=args.seed), **changes)
    thresholds, text_model = _caption_gate(args)
    bars, progress = _distill_progress(args, ("loss", "held_out_token_agreement"))
    try:
        _manifest, info = distill_captioner(
            args.bundle_path, args.output, student=args.student, images=args.data, options=options,
            thresholds=thresholds, accept_degradation=args.accept_degradation, checkpoint_dir=args.checkpoint,
            restart=args.restart, overwrite=args.force, threads=args.threads, text_model=text_model,
            **({} if args.synthetic is None else {"synthetic": args.synthetic}), progress=progress)
    finally:
        for bar in bars:
            bar.close()
    return _print_distilled(args, info, caption_distill_summary(info))


def cmd_train_av(args: argparse.Namespace) -> int:
    from edgemm._av import AudioVisual, fit_av_fusion, read_av_clips, save_av_fusion

    clips, labels = read_av_clips(args.data, args.labels)
    model = _load(args, default="audio-visual")
    if not isinstance(model, AudioVisual):
        raise InputError(f"bundle '{model.bundle.path}' is a {model.manifest.family} bundle, not audio-visual; "
                         "build one with 'edgemm export audio-visual -o DIR'.")
    fit = fit_av_fusion(model, clips, labels, steps=args.steps)
    save_av_fusion(model, fit, args.output, overwrite=args.force)
    if args.json:
        _print_json(fit.to_dict())
        return 0
    print(f"fitted on {fit.clips} clips, {len(labels)} labels: audio weight {fit.audio_weight:.2f}, "
          f"{fit.pooling} pooling, top-1 {fit.accuracy:.1%} (frames only {fit.video_only:.1%}, "
          f"audio only {fit.audio_only:.1%})")
    print(f"wrote {args.output}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgemm.export.fusion_train import TrainOptions
    from edgemm.export.models.fusion_bundle import train_fusion_bundle

    options = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           modality_dropout=args.modality_dropout, patience=args.patience,
                           val_fraction=args.val_fraction, seed=args.seed)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int, metrics: dict[str, Any]) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc="tower features" if stage == "features" else "training",
                                     unit="item" if stage == "features" else "epoch", disable=args.quiet)
        bar.update(done - bar.n)
        if metrics:
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if isinstance(v, float)})

    manifest, report = train_fusion_bundle(args.data, args.output, architecture=args.architecture, options=options,
                                           tanh_gate=args.tanh_gate, cache_dir=args.cache, overwrite=args.force,
                                           progress=progress)
    for bar in bars.values():
        bar.close()
    if args.json:
        _print_json({"report": report.to_dict(), "verification": manifest.verification["fusion"]})
        return 0
    print(report.summary())
    diff = manifest.verification["fusion"]["max_abs_diff"]
    print(f"verified fusion head: max abs diff {max(diff.values()):.1e} on {manifest.verification['fusion']['inputs']}")
    print(f"wrote {args.output}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from edgemm._files import atomic_write

    if bool(args.images) == bool(args.texts):
        raise InputError("give either --images or --texts (one of them).")
    # np.save's own rule; it only applies it to names, not to the open file atomic_write hands over.
    output = Path(args.output if args.output.endswith(".npy") else args.output + ".npy") if args.output else None
    if output:
        _check_folder(output, "embeddings")
    model = _load(args)
    if args.images:
        vectors = model.embed_images([str(p) for p in _image_paths(args.images)], batch_size=args.batch_size)
    else:
        vectors = model.embed_texts(args.texts, batch_size=args.batch_size)
    if output:
        atomic_write(output, lambda f: np.save(f, vectors), what="embeddings")
        print(f"wrote {vectors.shape[0]}x{vectors.shape[1]} embeddings to {output}")
    else:
        _print_json(vectors.round(6).tolist())
    return 0


def _embed_readable(model, chunk: list[Path], skipped: dict[Path, str]) -> tuple[list[Path], np.ndarray]:
    """Embed a chunk; if an image in it is unreadable, embed it image by image and note the bad ones in ``skipped``."""
    from tqdm import tqdm

    try:
        return chunk, model.embed_images([str(p) for p in chunk], batch_size=len(chunk))
    except InputError:
        pass  # one bad file fails the whole batch: find it without paying per-image calls on the happy path
    good, vectors = [], []
    for p in chunk:
        try:
            vectors.append(model.embed_images([str(p)])[0])
            good.append(p)
        except InputError as e:
            skipped[p] = str(e)
            tqdm.write(f"edgemm: skipped {p}: {e}", file=sys.stderr)
    return good, np.array(vectors, np.float32).reshape(len(good), model.dim)


def _check_qdrant_args(args: argparse.Namespace) -> None:
    """Check --qdrant LOCATION --collection NAME (a collection instead of an index file) before the model loads."""
    if args.qdrant and not args.collection:
        raise InputError("--qdrant needs --collection NAME (the Qdrant collection to use).")
    if args.collection and not args.qdrant:
        raise InputError("--collection names a Qdrant collection; give --qdrant LOCATION too.")
    if args.qdrant and getattr(args, "kind", None):
        raise InputError("--kind chooses the layout of a new index file; a Qdrant collection indexes itself.")


def _qdrant_index(args: argparse.Namespace, dim: int | None) -> Any:
    from edgemm._qdrant import QdrantIndex

    return QdrantIndex(args.qdrant, args.collection, dim=dim)


def cmd_index_add(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgemm._index import VectorIndex

    _check_qdrant_args(args)
    if args.qdrant:  # every positional argument is an image then
        images, path = [a for a in (args.index, *args.images) if a is not None], None
    elif not args.images:
        raise InputError("give an index file and at least one image file or directory "
                         "(or --qdrant LOCATION --collection NAME and the images).")
    else:
        images, path = args.images, Path(args.index)
        _check_folder(path, "index")
    if not images:
        raise InputError("give at least one image file or directory to add.")
    model = _load(args)
    if path is None:
        index, where = _qdrant_index(args, model.dim), f"Qdrant collection {args.collection!r} at {args.qdrant}"
    elif path.exists():
        index, where = VectorIndex.load(path), str(path)
        if args.kind and args.kind != index.kind:
            print(f"edgemm: {path} is an existing {index.kind} index and stays one; --kind {args.kind} applies "
                  "when creating an index", file=sys.stderr)
    else:
        index, where = VectorIndex(model.dim, kind=args.kind or "exact"), str(path)
    if index.dim != model.dim:
        raise InputError(f"index '{where}' holds {index.dim}-d vectors but the model embeds {model.dim}-d.")

    def save() -> None:
        if path is not None:  # Qdrant stores every add itself
            index.save(path)
    # Ids are resolved paths, so a file named twice (./a.jpg, a folder holding it, a link to it) is added once;
    # p.absolute() was the id before, and still marks a file as present in an index made then.
    todo, seen, present = [], set(), 0
    for p in _image_paths(images):
        real = p.resolve()
        if real not in seen:
            seen.add(real)
            if str(real) in index or str(p.absolute()) in index:
                present += 1
            else:
                todo.append(real)
    skipped: dict[Path, str] = {}
    added = unsaved = 0
    bar = tqdm(total=len(todo), desc="embedding", unit="image", disable=args.quiet)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start : start + args.batch_size]
        try:
            good, vectors = _embed_readable(model, chunk, skipped)
        except KeyboardInterrupt:  # keep what was embedded; a rerun of the same command continues from there
            if unsaved and path is not None:
                save()
                tqdm.write(f"edgemm: saved {len(index)} images to {path}; rerun to continue", file=sys.stderr)
            raise
        if good:
            index.add(vectors, ids=[str(p) for p in good],
                      metadata=[{"path": str(p)} for p in good])  # rerankers re-read images from it
            added, unsaved = added + len(good), unsaved + len(good)
        if unsaved >= args.checkpoint_every:  # a killed run loses at most this many images
            save()
            unsaved = 0
        bar.update(len(chunk))
    bar.close()
    if unsaved or (path is not None and not path.exists()):
        save()
    if args.json:
        _print_json({"added": added, "skipped": [{"path": str(p), "reason": r} for p, r in skipped.items()],
                     "already_present": present, "index": where, "kind": index.kind, "size": len(index)})
    else:
        print(f"added {added} images, skipped {len(skipped)} unreadable, {present} already present; "
              f"{where} now holds {len(index)}")
    return 1 if args.strict and skipped else 0


def cmd_index_search(args: argparse.Namespace) -> int:
    from edgemm._index import VectorIndex

    if bool(args.text) == bool(args.image):
        raise InputError("give either --text or --image (one of them).")
    if args.rerank is not None and not args.text:
        raise InputError("--rerank scores images against a text query; give --text.")
    if bool(args.index) == bool(args.qdrant):
        raise InputError("give either an index file or --qdrant LOCATION --collection NAME (one of them).")
    _check_qdrant_args(args)
    # A memory map opens a large HNSW file without reading it into memory (its checks still read it once).
    index = _qdrant_index(args, None) if args.qdrant else VectorIndex.load(args.index, mmap=args.mmap)
    model = _load(args, default="matching" if args.rerank is not None else "default")
    query = model.embed_texts([args.text]) if args.text else model.embed_images([args.image])
    options = {} if args.ef_search is None else {"ef_search": args.ef_search}
    if args.rerank is None:
        hits = index.search(query, k=args.k, **options)[0]
    else:
        hits = index.search(query, k=args.k, rerank=args.rerank, reranker=_matcher(model).reranker([args.text]),
                            **options)[0]
    if args.json:
        _print_json([{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits])
        return 0
    for h in hits:
        print(f"{h.score:.4f}  {h.id}")
    return 0


def cmd_eval_captioner(args: argparse.Namespace) -> int:
    from edgemm._caption_eval import eval_captioner
    from edgemm._model import load

    model = _load(args, default="captioner", captioner=True)
    text = None if args.no_retrieval else load(providers=tuple(args.providers.split(",")), threads=args.threads)
    report = eval_captioner(model, fashion_limit=args.limit or 1000, text_model=text, progress=not args.quiet,
                            num_beams=args.beams)
    if args.json:
        _print_json({"bundle": str(model.bundle.path), **report})
        return 0
    print("source          images  BLEU-1  BLEU-2  CIDEr-D  exact  caption->label")
    for name, row in report["scores"].items():
        if name == "macro":
            continue
        label = f"{row['label_accuracy']:.1%}" if "label_accuracy" in row else "-"
        print(f"{name:<15} {row['n']:>6}  {row['bleu1']:.3f}   {row['bleu2']:.3f}   {row['cider_d']:.3f}    "
              f"{row['exact_match']:.1%}  {label}")
    for r in report["photos"]:
        print(f"  {r['photo']:<28} {r['subject']:<14} -> {r['caption']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from edgemm._eval import eval_fashion_mnist, eval_sample_photos

    if args.captioner:
        return cmd_eval_captioner(args)
    model = _load(args)
    photos = eval_sample_photos(model)
    fmnist = eval_fashion_mnist(model, limit=args.limit, progress=not args.quiet)
    if args.json:
        _print_json({"bundle": str(model.bundle.path), "fashion_mnist": fmnist, "sample_photos": photos})
        return 0
    print(f"Fashion-MNIST zero-shot top-1: {fmnist['top1']:.1%} on {fmnist['images']} test images (chance 10%)")
    print(f"Sample photos: {photos['objects_correct']}/{photos['objects']} object photos correct, "
          f"{photos['top1']:.0%} of all {len(photos['photos'])}")
    for r in photos["photos"]:
        mark = "ok " if r["correct"] else "MISS"
        print(f"  {mark} {r['photo']:<28} {r['subject']:<14} -> {r['predicted']} ({r['score']:.2f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgemm", description="Multimodal models at the edge.")
    sub = parser.add_subparsers(dest="command", required=True)

    def runtime_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bundle", default=None, help="bundle directory (default: the default model, built on first use)")
        p.add_argument("--providers", default="cpu", help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
        p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
        p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                       help="tensorrt: native engines, built, verified and cached on first use")
        p.add_argument("--engine-precision", default=None, choices=("fp32", "fp16", "int8"),
                       help="TensorRT engines' precision (default: the bundle's own types)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("export", help="build, export and verify a bundle; or write a Triton model repository")
    p.add_argument("model", choices=(*EXPORT_STEPS, "triton"),
                   help="'triton BUNDLE': a Triton model repository of a bundle (see the triton options); "
                        "'default': the packaged EfficientNet-Lite0 + MiniLM dual encoder; "
                        "'audio-visual': the default plus SoundNet-8 (frames + sound); "
                        "'matching': the default plus its image-text matching head; "
                        "'clip': a local Hugging Face CLIPModel or SiglipModel folder given with --from; "
                        "'captioner': the built-in captioner, or with --from a local VisionEncoderDecoderModel "
                        "(ViT/DeiT + GPT-2), BlipForConditionalGeneration or BlipForQuestionAnswering folder")
    p.add_argument("bundle", nargs="?", default=None, help="triton: the bundle to write a repository for")
    p.add_argument("--from", dest="source", help="checkpoint folder (config.json, weights, tokenizer, preprocessor config)")
    p.add_argument("--name", help="bundle name (default: the folder's name)")
    p.add_argument("-o", "--output", required=True, help="bundle (or, for triton, repository) directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing bundle or repository")
    p.add_argument("-q", "--quiet", action="store_true")
    t = p.add_argument_group("triton", "options of 'edgemm export triton BUNDLE -o REPO'")
    t.add_argument("--target", default="cpu", choices=("cpu", "gpu"),
                   help="gpu: KIND_GPU and ONNX Runtime's TensorRT accelerator (engine cache, FP16 image graphs)")
    t.add_argument("--graph-backend", default="onnxruntime", choices=("onnxruntime", "python"),
                   help="python: graphs run by edgemm inside Triton's Python backend (a Triton without ONNX Runtime)")
    t.add_argument("--max-batch", type=_positive_int, default=32, help="max_batch_size of the graphs that batch")
    t.add_argument("--max-delay-ms", type=float, default=0.0, help="dynamic_batching queue delay (default 0)")
    t.add_argument("--instances", type=_positive_int, default=1, help="instance_group count per model")
    t.add_argument("--no-fp16", action="store_true", help="gpu: TensorRT FP32 for every graph")
    t.add_argument("--fp16-text", action="store_true",
                   help="gpu: FP16 for the text graph too (measure it first: a known accuracy trap)")
    t.add_argument("--workspace-gb", type=float, default=2.0, help="gpu: TensorRT workspace limit (GiB)")
    t.add_argument("--engine-cache", default="/tmp/edgemm-triton-engines",
                   help="gpu: where TensorRT engines and timing caches persist on the server")
    t.add_argument("--engines", action="store_true",
                   help="gpu: serve TensorRT plans (tensorrt_plan) checked, or built and verified, on this machine "
                        "— run it on the Triton host (its TensorRT must be the one that built them)")
    t.add_argument("--site-packages", default="",
                   help="folders (':'-separated) added to Triton's Python, e.g. a virtualenv's site-packages with "
                        "edgemm installed")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="convert a bundle to fp16 or int8, gated against its fp32 source")
    p.add_argument("bundle_path", help="the fp32 bundle")
    p.add_argument("--precision", required=True, help="fp16 (GPU targets) or int8")
    p.add_argument("--dynamic", action="store_true", help="int8: dynamic quantization (MatMul/Gemm, no calibration)")
    p.add_argument("--calibration", action="append", metavar="PATH",
                   help="a folder of images and/or a text file with one text per line (repeat for both; "
                        "default: packaged images and texts); every fifth item is held out for the gate")
    p.add_argument("--graphs", help="comma-separated graphs to convert, e.g. text_encoder (default: all)")
    p.add_argument("--calibrate-method", default="minmax", help="minmax, percentile or entropy")
    p.add_argument("--activations", default="uint8", help="uint8 (x86 CPUs) or int8 (TensorRT, ARM)")
    p.add_argument("--all-matmuls", action="store_true", help="also quantize activation x activation MatMuls")
    p.add_argument("--min-mean-cosine", type=float, default=0.99, help="gate: mean embedding cosine per tower")
    p.add_argument("--min-worst-cosine", type=float, default=0.97, help="gate: worst embedding cosine per tower")
    p.add_argument("--min-agreement", type=float, default=0.98, help="gate: zero-shot top-1 agreement")
    _caption_gate_arguments(p)
    p.add_argument("--no-recover", action="store_true", help="on a failed gate, do not keep sensitive nodes in float")
    p.add_argument("--accept-degradation", action="store_true", help="write the bundle even if the gate fails")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads while measuring")
    p.add_argument("--json", action="store_true", help="print the quantization report as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    from edgemm._bench import add_parser as add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser("engine", help="TensorRT engines of a bundle: build them on this device, or list the cache")
    esub = p.add_subparsers(dest="action", required=True)
    for action, text in (("build", "build, verify against ONNX Runtime and cache the bundle's engines (cached, valid "
                                    "ones are kept)"),
                         ("list", "list the cached engines and their sidecars")):
        q = esub.add_parser(action, help=text)
        q.add_argument("bundle_path")
        q.add_argument("--engine-dir", default=None, help="engine cache (default: BUNDLE/engines, or under "
                                                         "$EDGEMM_HOME when the bundle is read-only)")
        q.add_argument("--json", action="store_true")
        if action == "build":
            q.add_argument("--precision", default=None, choices=("fp32", "fp16", "int8"),
                           help="default: the bundle's own types; fp16 of an fp32 bundle lets TensorRT <= 10 run "
                                "layers in fp16")
            q.add_argument("--axis", action="append", metavar="NAME=MIN:OPT:MAX",
                           help="an optimization profile range, e.g. batch=1:8:32 (repeatable)")
            q.add_argument("--no-rebuild", action="store_true", help="fail, naming every difference, instead of "
                                                                     "rebuilding missing or stale engines")
            q.add_argument("--workspace-mib", type=int, default=None,
                           help="builder workspace (default: half the free device memory, at most 4096)")
            q.add_argument("--images", default=None, help="a folder of your own images to verify the engines on")
            q.add_argument("--device", type=int, default=0, help="CUDA device index")
            q.add_argument("-q", "--quiet", action="store_true")
        q.set_defaults(func=cmd_engine)

    p = sub.add_parser("info", help="show a bundle's manifest (and check its files)")
    p.add_argument("bundle_path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("classify", help="zero-shot classify images")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--labels", nargs="+", help="candidate labels (default: the bundle's labels)")
    p.add_argument("--labels-file", help="a text file with one label per line")
    p.add_argument("-k", "--top-k", type=int, default=3)
    runtime_options(p)
    p.set_defaults(func=cmd_classify)

    from edgemm._watch import add_parser as add_watch_parser

    add_watch_parser(sub, runtime_options)

    p = sub.add_parser("caption", help="caption images (a captioner bundle; default: the built-in captioner)")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--beams", type=_positive_int, default=None, help="beam search with N beams (default: the bundle's)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None, help="tokens to generate at most")
    p.add_argument("--prompt", default=None, help="text the caption continues, for models that take one (BLIP)")
    p.add_argument("--question", default=None, help="ask a question about each image (a BLIP VQA bundle)")
    runtime_options(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("serve", help="serve a bundle over the Open Inference Protocol (KServe v2; Triton's clients "
                                     "and perf_analyzer work against it)",
                       description="Serve a bundle over HTTP with Triton's routes: each graph is a model, plus "
                       "classify / embed_image / embed_text (a dual encoder) or caption (a captioner); concurrent "
                       "requests share graph runs through a dynamic batcher.")
    p.add_argument("bundle", nargs="?", default=None, help="bundle directory (default: the built-in model)")
    p.add_argument("--default", default="default", choices=("default", "captioner", "matching", "audio-visual"),
                   help="the built-in model to serve when no bundle is given")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    p.add_argument("--max-batch", type=_positive_int, default=32, help="rows one graph run takes at most")
    p.add_argument("--max-delay-ms", type=float, default=0.0,
                   help="how long a request waits for others to share its graph run (default 0: a run takes "
                        "whatever queued while the previous one ran)")
    p.add_argument("--workers", type=_positive_int, default=1, help="graph runs in flight at once, per graph")
    p.add_argument("--max-body-mb", type=_positive_int, default=64, help="largest request body (MiB)")
    p.add_argument("--max-items", type=_positive_int, default=256,
                   help="images or texts one classify / embed / caption request may carry")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.add_argument("--providers", default="cpu", help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per graph (default: cores / workers)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--engine-precision", default=None, choices=("fp32", "fp16", "int8"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("distill", help="distil a bundle's text or image tower, or a captioner's decoder, into a "
                                       "smaller, faster student (gated)")
    p.add_argument("bundle_path", help="the teacher: an fp32 dual-encoder or captioner bundle")
    p.add_argument("--tower", default="text", choices=("text", "image", "decoder"),
                   help="the tower to replace with a student (decoder: a captioner's)")
    p.add_argument("--student", default=None,
                   help="text: layers=N (teacher layers kept, spread evenly), layers=I,J,K, optionally ,ffn=W, or a "
                        "preset (default: minilm-l3-ffn1280 for the default model, layers=3 otherwise); image: "
                        "size=S[,depth=D][,expand=F] or a preset (default: lite0-160); decoder: layers=N or "
                        "layers=I,J (default: 2 of the built-in captioner's 4, half of another's)")
    p.add_argument("--data", help="text: a text file (one text per line) or a folder of .txt files; image, decoder: "
                                  "a folder of unlabelled images (default: packaged data the gate does not use)")
    p.add_argument("--epochs", type=int, help="most passes over the data (default 3 for text, 4 for images)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-kl", type=float, default=None, metavar="WEIGHT",
                   help="text: also train on the runtime's label scores of fixed images (each batch of texts a label "
                        "set), for agreement (default: the preset's)")
    p.add_argument("--min-mean-cosine", type=float, default=0.95, help="gate: held-out embedding cosine to the teacher")
    p.add_argument("--min-retention", type=float, default=0.95, help="gate: student / teacher zero-shot top-1")
    p.add_argument("--min-agreement", type=float, default=0.95,
                   help="gate: the teacher's top label kept, over diverse held-out label sets and images")
    _caption_gate_arguments(p)
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="decoder: simulated inputs the teacher also captions for training, where its image side "
                        "allows them (the built-in captioner's pseudo images; default 4000, 0 for none)")
    p.add_argument("--accept-degradation", action="store_true", help="write the student even if it misses the gate")
    p.add_argument("--checkpoint", help="training checkpoint folder (default: OUTPUT.distill; resumed when present)")
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint instead of resuming it")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--threads", type=int, default=None, help="training and measuring threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("match", help="how likely each text describes the image (an image-text matching head)")
    p.add_argument("image", help="image file")
    p.add_argument("texts", nargs="+", help="candidate descriptions")
    runtime_options(p)
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("classify-av", help="zero-shot classify a clip from its frames and/or its sound")
    p.add_argument("--frames", nargs="+", help="the clip's frames: image files or a directory (in order)")
    p.add_argument("--audio", help="the clip's sound: a WAV file (any rate, mono or multi-channel)")
    p.add_argument("--labels", nargs="+", help="candidate labels (default: the bundle's labels)")
    p.add_argument("--labels-file", help="a text file with one label per line")
    p.add_argument("--audio-weight", type=float, default=None, help="the audio's share of the mix, 0..1 "
                   "(default: the bundle's)")
    p.add_argument("--pooling", choices=("mean", "attention"), default=None, help="frame pooling over time")
    p.add_argument("-k", "--top-k", type=int, default=3)
    runtime_options(p)
    p.set_defaults(func=cmd_classify_av)

    p = sub.add_parser("train", help="train a model on your data and export it as a verified bundle")
    tsub = p.add_subparsers(dest="kind", required=True)
    p = tsub.add_parser("fusion", help="an image+text classifier over frozen default towers")
    p.add_argument("data", help="a CSV with columns image,text,label (paths relative to it), or a folder with data.csv")
    p.add_argument("--architecture", default="gated", choices=("early", "late", "gated", "cross_attention"))
    p.add_argument("--tanh-gate", action="store_true", help="cross_attention: Flamingo-style gated residuals")
    p.add_argument("--modality-dropout", type=float, default=0.0,
                   help="chance per training row of dropping the image or the text (robust to a missing one)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=8, help="early stopping: epochs without a better validation loss")
    p.add_argument("--val-fraction", type=float, default=0.2, help="rows per label held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="feature cache folder (default: $EDGEMM_HOME/cache/fusion-features)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_train)
    p = tsub.add_parser("av", help="fit an audio-visual bundle's audio weight and frame pooling to labelled clips")
    p.add_argument("data", help="a CSV with columns frames,audio,label (frames: an image or a folder; audio: a WAV)")
    p.add_argument("--labels", nargs="+", help="the label set (default: the CSV's labels)")
    p.add_argument("--steps", type=int, default=20, help="audio weights tried between 0 and 1")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create (a copy with the fit)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    runtime_options(p)
    p.set_defaults(func=cmd_train_av)

    p = sub.add_parser("embed", help="embed images or texts")
    p.add_argument("--images", nargs="+", help="image files or directories")
    p.add_argument("--texts", nargs="+", help="texts")
    p.add_argument("-o", "--output", help="write a .npy file, atomically; '.npy' is appended when missing "
                   "(default: print JSON)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    runtime_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("index", help="a vector index file (or Qdrant collection) of image embeddings")
    isub = p.add_subparsers(dest="index_command", required=True)

    def index_location_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--qdrant", metavar="LOCATION", help="use a Qdrant collection instead of an index file: "
                       "a server URL (http://localhost:6333) or a local folder; pip install 'edgemm[qdrant]'")
        q.add_argument("--collection", metavar="NAME", help="the Qdrant collection (created when missing)")

    q = isub.add_parser("add", help="embed images and add them (creates the index if needed)",
                        description="Embed images and add them to an index file, created if needed. Each file is "
                        "added once (by its resolved path) and images already in the index are skipped, so "
                        "rerunning an interrupted command continues it. Unreadable images are reported on stderr "
                        "and skipped. Exit status: 0, or 1 with --strict when an image was skipped (the rest are "
                        "still added), 2 for errors.")
    q.add_argument("index", nargs="?", help="index file (with --qdrant, leave it out: every argument is an image)")
    q.add_argument("images", nargs="*", help="image files or directories")
    q.add_argument("--kind", choices=("exact", "hnsw"), help="layout of a new index file: exact (every vector "
                   "compared; the default) or hnsw (an approximate graph for large collections; pip install "
                   "'edgemm[ann]'). An existing file keeps its kind")
    index_location_options(q)
    q.add_argument("--batch-size", type=_positive_int, default=32)
    q.add_argument("--checkpoint-every", type=_positive_int, default=1000, metavar="N",
                   help="save the index after every N new images (default 1000), so a killed run keeps them")
    q.add_argument("--strict", action="store_true", help="exit with status 1 if any image was unreadable")
    runtime_options(q)
    q.set_defaults(func=cmd_index_add)
    q = isub.add_parser("search", help="search the index with a text or an image")
    q.add_argument("index", nargs="?", help="index file (or --qdrant)")
    index_location_options(q)
    q.add_argument("--ef-search", type=_positive_int, metavar="N", help="candidates an approximate (hnsw or "
                   "Qdrant) search keeps: more for recall, fewer for speed (default: the index's own)")
    q.add_argument("--mmap", action="store_true", help="serve an hnsw index file from a memory map instead of "
                   "reading it into memory")
    q.add_argument("--text", help="query text")
    q.add_argument("--image", help="query image file")
    q.add_argument("-k", type=int, default=5)
    q.add_argument("--rerank", type=int, metavar="N", help="rescore the top N vector hits with an image-text "
                   "matching head (default bundle: the built-in matching model)")
    runtime_options(q)
    q.set_defaults(func=cmd_index_search)

    p = sub.add_parser("eval", help="zero-shot accuracy on Fashion-MNIST and the sample photos (--captioner: "
                                    "caption quality on held-out emoji, Fashion-MNIST and the photos)")
    p.add_argument("--limit", type=int, default=None, help="only the first N Fashion-MNIST test images")
    p.add_argument("--captioner", action="store_true",
                   help="evaluate a captioner bundle (default: the built-in captioner): BLEU-1/2, CIDEr-D, exact "
                        "match and caption->label retrieval")
    p.add_argument("--beams", type=_positive_int, default=None, help="--captioner: beams (default: the bundle's)")
    p.add_argument("--no-retrieval", action="store_true",
                   help="--captioner: skip caption->label retrieval (it embeds with the default dual encoder)")
    runtime_options(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_text_args(args)
        return args.func(args)
    except EdgemmError as e:
        print(f"edgemm: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RecursionError) as e:  # hostile files: huge sizes, deep nesting
        print(f"edgemm: error: an input is too large or too deeply nested to read ({type(e).__name__}); "
              "check the files given.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgemm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
