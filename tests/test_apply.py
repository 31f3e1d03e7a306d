"""vidaccel.apply / vidaccel.remove: install, reverse exactly, refuse what is unsupported."""

import warnings

import pytest
import torch
from _tiny import AffineConfig, RecordConfig, run, tiny_causal_pipe, tiny_pipe
from diffusers import WanPipeline
from diffusers.hooks import HookRegistry
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

import vidaccel
from vidaccel import AccelProcessor, DenseProcessor
from vidaccel.metrics import relative_error
from vidaccel.state import HOOK_NAME, context_for, context_of


def _attention_modules(transformer):
    return [m for m in transformer.modules() if hasattr(m, "set_processor")]


def _context_parallel():
    return ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))


def test_apply_installs_one_shared_processor_and_the_context():
    pipe = tiny_pipe()
    record = RecordConfig()
    processors = vidaccel.apply(pipe, record, backend="reference")
    assert len(processors) == 1 and isinstance(processors[0], AccelProcessor)
    assert processors[0].backend == "reference" and processors[0].configs == (record,)
    modules = _attention_modules(pipe.transformer)
    assert len(modules) == 4 and all(m.processor is processors[0] for m in modules)
    context = context_of(pipe.transformer)
    assert context is not None and all(context_for(m) is context for m in modules)


def test_remove_restores_stock_processors_bit_identically():
    pipe = tiny_pipe()
    modules = _attention_modules(pipe.transformer)
    stock_processors = [m.processor for m in modules]
    stock = run(pipe)

    vidaccel.apply(pipe, AffineConfig(kinds=("self",), mul=1.5))
    patched = run(pipe)
    vidaccel.apply(pipe)  # re-applying keeps the processors saved first
    vidaccel.remove(pipe)

    assert relative_error(patched, stock) > 1e-3  # the patch really acted
    assert [m.processor for m in modules] == stock_processors
    assert all(a is b for a, b in zip((m.processor for m in modules), stock_processors, strict=True))
    assert HookRegistry.check_if_exists_or_initialize(pipe.transformer).get_hook(HOOK_NAME) is None
    assert context_of(pipe.transformer) is None and all(context_for(m) is None for m in modules)
    assert torch.equal(run(pipe), stock)
    vidaccel.remove(pipe)  # removing twice is harmless
    assert torch.equal(run(pipe), stock)


def test_remove_after_plain_set_attn_processor_restores_stock_processors():
    pipe = tiny_pipe()
    modules = _attention_modules(pipe.transformer)
    stock_types = [type(m.processor) for m in modules]
    assert all(cls is type(m)._default_processor_cls for cls, m in zip(stock_types, modules, strict=True))
    stock = run(pipe)

    pipe.transformer.set_attn_processor(DenseProcessor())  # nothing saved: apply was never called
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "installed without vidaccel.apply" warning
        run(pipe)
    vidaccel.remove(pipe)

    assert [type(m.processor) for m in modules] == stock_types
    assert len({id(m.processor) for m in modules}) == len(modules)  # one stock processor per module
    assert not any(isinstance(m.processor, AccelProcessor) for m in modules)
    assert torch.equal(run(pipe), stock)
    vidaccel.remove(pipe)  # removing twice is harmless
    assert [type(m.processor) for m in modules] == stock_types
    assert torch.equal(run(pipe), stock)


def test_remove_after_plain_set_attn_processor_keeps_backend_and_parallel_config():
    pipe = tiny_pipe()
    pipe.transformer.set_attn_processor(DenseProcessor())
    pipe.transformer.set_attention_backend("native")
    modules = _attention_modules(pipe.transformer)
    backends = {m.processor._attention_backend for m in modules}
    assert len(backends) == 1 and None not in backends  # diffusers set it on our processor
    parallel = _context_parallel()
    modules[0].processor._parallel_config = parallel  # as enable_parallelism would

    vidaccel.remove(pipe)

    assert not any(isinstance(m.processor, AccelProcessor) for m in modules)
    assert {m.processor._attention_backend for m in modules} == backends
    assert all(m.processor._parallel_config is parallel for m in modules)  # one shared processor had it


def test_remove_after_apply_then_plain_set_attn_processor_leaves_no_vidaccel_processor():
    pipe = tiny_pipe()
    modules = _attention_modules(pipe.transformer)
    stock_processors = [m.processor for m in modules]
    stock = run(pipe)
    vidaccel.apply(pipe)
    pipe.transformer.set_attn_processor(DenseProcessor())
    vidaccel.remove(pipe)
    assert all(a is b for a, b in zip((m.processor for m in modules), stock_processors, strict=True))
    assert torch.equal(run(pipe), stock)


def test_remove_on_a_never_patched_model_is_a_no_op():
    pipe = tiny_pipe()
    modules = _attention_modules(pipe.transformer)
    stock_processors = [m.processor for m in modules]
    stock = run(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vidaccel.remove(pipe)
        vidaccel.remove(pipe.transformer)
    assert all(a is b for a, b in zip((m.processor for m in modules), stock_processors, strict=True))
    assert context_of(pipe.transformer) is None
    assert torch.equal(run(pipe), stock)


def test_wan22_pipeline_patches_both_experts():
    base = tiny_pipe()
    expert_2 = tiny_pipe(seed=1).transformer
    pipe = WanPipeline(**dict(base.components, transformer_2=expert_2), boundary_ratio=0.95)
    pipe.set_progress_bar_config(disable=True)
    stock = run(pipe, steps=3)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert timesteps[0] >= 950 > timesteps[-1]  # both experts denoise

    records = RecordConfig(kinds=("self",))
    processors = vidaccel.apply(pipe, records)
    assert len(processors) == 2 and processors[0] is not processors[1]
    assert all(m.processor is processors[1] for m in _attention_modules(expert_2))
    patched = run(pipe, steps=3)
    assert relative_error(patched, stock) <= 1e-5

    contexts = {context_of(pipe.transformer), context_of(expert_2)}
    assert len(contexts) == 2 and None not in contexts
    seen = {(r.attn in set(_attention_modules(expert_2)), r.timestep) for r in records.log}
    assert {t for in_2, t in seen if not in_2} == {t for t in timesteps if t >= 950}
    assert {t for in_2, t in seen if in_2} == {t for t in timesteps if t < 950}

    vidaccel.remove(pipe)
    assert context_of(expert_2) is None
    assert torch.equal(run(pipe, steps=3), stock)


def test_set_attn_processor_without_apply_warns_once_and_serves():
    pipe = tiny_pipe()
    dense = run(pipe)
    record = RecordConfig()
    pipe.transformer.set_attn_processor(AccelProcessor(record))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(pipe)
    named = [w for w in caught if "vidaccel.apply" in str(w.message)]
    assert len(named) == 1 and "RecordMethod" in str(named[0].message)
    assert record.log and not any(r.has_context for r in record.log)
    assert relative_error(out, dense) <= 1e-5

    pipe.transformer.set_attn_processor(AccelProcessor(RecordConfig(needs_context=False)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(pipe)
    assert not [w for w in caught if "vidaccel.apply" in str(w.message)]


def test_unsupported_models_are_refused_with_the_supported_list():
    with pytest.raises(
        ValueError, match="does not support Linear; supported transformer classes: WanTransformer3DModel"
    ):
        vidaccel.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pipe_or_transformer must be a diffusers pipeline"):
        vidaccel.apply(object())


def test_bad_arguments_leave_the_model_untouched():
    pipe = tiny_pipe()
    before = [m.processor for m in _attention_modules(pipe.transformer)]
    with pytest.raises(ValueError, match="backend must be one of"):
        vidaccel.apply(pipe, backend="cuda")
    with pytest.raises(ValueError, match=r"configs\[0\] must be a vidaccel MethodConfig"):
        vidaccel.apply(pipe, "dense")
    assert [m.processor for m in _attention_modules(pipe.transformer)] == before
    assert context_of(pipe.transformer) is None


def test_context_parallel_is_refused_at_apply():
    pipe = tiny_pipe()
    before = [m.processor for m in _attention_modules(pipe.transformer)]
    pipe.transformer._parallel_config = _context_parallel()
    with pytest.raises(
        NotImplementedError, match="WanTransformer3DModel is configured for diffusers context parallelism"
    ):
        vidaccel.apply(pipe)
    assert [m.processor for m in _attention_modules(pipe.transformer)] == before
    assert context_of(pipe.transformer) is None


def test_context_parallel_is_refused_at_the_first_call():
    pipe = tiny_pipe()
    (processor,) = vidaccel.apply(pipe)
    processor._parallel_config = _context_parallel()  # what enable_parallelism does after apply
    with pytest.raises(
        NotImplementedError, match="vidaccel processor is configured for diffusers context parallelism"
    ):
        run(pipe, steps=1)


def test_plain_set_attn_processor_refuses_context_parallel_too():
    pipe = tiny_pipe()
    processor = DenseProcessor()
    processor._parallel_config = ParallelConfig()  # no context parallelism: fine
    pipe.transformer.set_attn_processor(processor)
    run(pipe, steps=1)
    processor._parallel_config = _context_parallel()
    with pytest.raises(NotImplementedError, match="context parallelism"):
        run(pipe, steps=1)


def test_compiled_transformer_with_vidaccel_matches_stock():
    """``torch.compile`` on a patched transformer: the processors trace (one graph break, where the
    step-context hook reads the timestep) and the output matches the stock pipeline."""
    pipe = tiny_pipe()
    stock = run(pipe)
    vidaccel.apply(pipe, backend="reference")
    eager_transformer = pipe.transformer
    pipe.transformer = torch.compile(eager_transformer, backend="aot_eager")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = run(pipe)
    finally:
        pipe.transformer = eager_transformer
    assert relative_error(compiled, stock) <= 1e-5


@pytest.mark.parametrize(
    "configs, needing",
    [
        ((vidaccel.TempCacheConfig(),), "TempCache acts"),
        ((vidaccel.AnnSAConfig(top_k=2), vidaccel.FlashBlockConfig()), "FlashBlock acts"),
        ((vidaccel.TempCacheConfig(), vidaccel.FlashBlockConfig()), "FlashBlock and TempCache act"),
    ],
)
def test_rollout_only_methods_are_refused_where_no_rollout_runs(configs, needing):
    """TempCache and FlashBlock change nothing on a WanPipeline: apply says so and changes nothing; on a
    rollout pipeline, or a bare transformer (which cannot tell), they install."""
    pipe = tiny_pipe(head_dim=64)
    stock = dict(pipe.transformer.attn_processors)
    message = f"{needing} on the KV cache of an autoregressive rollout, which WanPipeline does not run: use vidaccel.pipelines.CausalWanPipeline"
    with pytest.raises(ValueError, match=message):
        vidaccel.apply(pipe, *configs)
    assert dict(pipe.transformer.attn_processors) == stock and context_of(pipe.transformer) is None
    assert len(vidaccel.apply(pipe.transformer, *configs)) == 1
    vidaccel.remove(pipe)
    causal, _ = tiny_causal_pipe()
    vidaccel.apply(causal, *configs)
    vidaccel.remove(causal)


def test_two_configs_of_one_method_are_refused():
    pipe = tiny_pipe(head_dim=64)
    stock = dict(pipe.transformer.attn_processors)
    twice = (vidaccel.AnnSAConfig(top_k=2), vidaccel.AnnCAConfig(top_k=2), vidaccel.AnnSAConfig(top_k=3))
    with pytest.raises(ValueError, match=r"configs\[2\] is a second AnnSAConfig: pass one config per method"):
        vidaccel.apply(pipe, *twice)
    assert dict(pipe.transformer.attn_processors) == stock  # nothing installed
    with pytest.raises(ValueError, match="a second TempCacheConfig"):
        vidaccel.apply(pipe.transformer, vidaccel.TempCacheConfig(), vidaccel.TempCacheConfig(threshold=0.9))
