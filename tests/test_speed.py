"""Speed options (raygpt.core.parallel, raygpt.core.step): they must not change what is computed."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from raygpt.config.cli import load_config
from raygpt.config.schema import ConfigError, TrainConfig
from raygpt.core.data import Batches
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import set_attention_backend, uses_cuda_graphs
from raygpt.core.step import NonFiniteGuard, eval_group_size


def test_eval_group_size_bounds_memory_and_divides():
    # shakespeare_char's baby GPT: 64 x 256 tokens, MLP width 1536 -> 10 batches of 200 per pass
    assert eval_group_size(200, 64, 256, 65, 384) == 10
    assert eval_group_size(100, 64, 256, 65, 384) == 10
    # GPT-2: a batch's logits are already 618M elements -> one batch at a time
    assert eval_group_size(200, 12, 1024, 50304, 768) == 1
    # a prime count that exceeds the bound falls back to 1; small models take everything at once
    assert eval_group_size(199, 64, 256, 65, 384) == 1
    assert eval_group_size(20, 12, 64, 65, 128) == 20
    for n in range(1, 60):
        g = eval_group_size(n, 8, 128, 50304, 768)
        assert n % g == 0 and g * 8 * 128 * 50304 <= max(1 << 28, 8 * 128 * 50304)


def test_grouped_eval_batches_are_the_single_batches_stacked(char_data):
    batches = Batches(char_data / "shakespeare_char", block_size=16, batch_size=4, seed=3)
    X, Y = batches.eval_batch("val", [0, 1, 2])
    singles = [batches.eval_batch("val", k) for k in (0, 1, 2)]
    assert torch.equal(X, torch.cat([x for x, _ in singles])) and torch.equal(Y, torch.cat([y for _, y in singles]))


def test_grouped_mean_loss_equals_mean_of_batch_losses(char_data):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65)).eval()
    batches = Batches(char_data / "shakespeare_char", block_size=16, batch_size=4, seed=3)
    with torch.no_grad():
        separate = sum(model(*batches.eval_batch("val", k))[1] for k in range(6)) / 6
        grouped = model(*batches.eval_batch("val", list(range(6))))[1]
    assert torch.allclose(separate, grouped, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-on-device", "unfused-on-host"])
def test_nonfinite_guard_skips_bad_steps_applies_good_ones_and_stops_a_streak(fused, capsys):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused)  # fused AdamW takes found_inf
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = NonFiniteGuard(max_in_a_row=2, device=torch.device("cpu"), out_dir="OUT")
    weight.grad = torch.full((3,), float("nan"))
    guard.step(optimizer, scaler, torch.tensor(float("nan")))
    assert torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state.get(weight, {}).get("step", 0)
    assert guard.check(iter_num=0) == 1
    assert (
        "warning: iter 0: 1 step(s) skipped for a non-finite loss or gradient norm (1 in a row)"
        in capsys.readouterr().out
    )
    weight.grad = torch.ones(3)
    guard.step(optimizer, scaler, torch.tensor(1.0))
    assert (weight.detach() < 1).all() and optimizer.state[weight]["step"].item() == 1
    assert guard.check(iter_num=1) == 0 and capsys.readouterr().out == ""
    assert not hasattr(optimizer, "found_inf")  # GradScaler's protocol attribute is not left behind
    for _ in range(2):
        guard.step(optimizer, scaler, torch.tensor(float("inf")))
    with pytest.raises(
        FloatingPointError, match=r"^2 consecutive steps .* at iter 3; stopping \(the last good checkpoint is in OUT\)"
    ):
        guard.check(iter_num=3)


def test_attention_backend_switches():
    flags = ("flash_sdp_enabled", "cudnn_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled")
    before = [getattr(torch.backends.cuda, f)() for f in flags]
    try:
        set_attention_backend("flash")
        assert [getattr(torch.backends.cuda, f)() for f in flags] == [True, False, False, True]
        set_attention_backend("auto")  # leaves the current choice alone
        assert [getattr(torch.backends.cuda, f)() for f in flags] == [True, False, False, True]
    finally:
        for flag, value in zip(
            ("enable_flash_sdp", "enable_cudnn_sdp", "enable_mem_efficient_sdp", "enable_math_sdp"), before
        ):
            getattr(torch.backends.cuda, flag)(value)


def test_speed_keys_are_validated():
    cfg = load_config(["--compile_mode=reduce-overhead", "--attention=cudnn"])
    # reduce-overhead is the mode that records CUDA graphs, on a GPU only; the default mode records none.
    assert uses_cuda_graphs(cfg.compile_mode, "cuda") and not uses_cuda_graphs(cfg.compile_mode, "cpu")
    assert not uses_cuda_graphs(TrainConfig().compile_mode, "cuda")
    with pytest.raises(ConfigError, match="compile_mode"):
        TrainConfig(compile_mode="fast")
    with pytest.raises(ConfigError, match="attention"):
        TrainConfig(attention="flash3")


def test_eager_eval_of_a_compiled_model_compiles_nothing_and_matches_the_model():
    """compile_eval=False: eval runs the compiled model under torch.compiler's force_eager stance."""
    from torch._dynamo.utils import counters

    from raygpt.core.parallel import compile_model

    for regions in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=65, dropout=0.1))
        X, Y = torch.randint(0, 65, (3, 16)), torch.randint(0, 65, (3, 16))
        model.eval()
        with torch.no_grad():
            expected = model(X, Y)[1]
        compiled = compile_model(model, "default", regions=regions)
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            got = compiled(X, Y)[1]
        assert torch.equal(got, expected)
        assert counters["stats"]["unique_graphs"] == 0  # nothing was traced or compiled


def test_regional_compile_compiles_each_block_in_place_and_keeps_nanogpt_keys():
    from raygpt.core.parallel import compile_model

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=65))
    keys = list(model.state_dict())
    compiled = compile_model(model, "default", regions=True)
    assert compiled is model and list(compiled.state_dict()) == keys  # no _orig_mod. prefixes
    assert all(block._compiled_call_impl is not None for block in model.transformer.h)
    assert getattr(model, "_compiled_call_impl", None) is None  # embeddings, head and loss stay eager


def test_fast_exit_keeps_what_a_normal_exit_does(tmp_path):
    """exit_without_teardown skips only the interpreter's teardown: a non-daemon thread still finishes,
    atexit handlers run (after it, as in Python's own exit), buffered output is flushed, the code is kept."""
    program = textwrap.dedent(f"""
        import atexit, pathlib, sys, threading, time
        from raygpt.processes import exit_without_teardown
        out = pathlib.Path({str(tmp_path)!r})
        def late_writer():
            time.sleep(0.5)
            (out / "thread").write_text("done")
        threading.Thread(target=late_writer).start()
        atexit.register(lambda: (out / "atexit").write_text(str((out / "thread").exists())))
        sys.stdout.write("unflushed line")
        exit_without_teardown(3)
        (out / "after").write_text("not reached")
    """)
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # so the flush is needed
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=buffered)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "unflushed line"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "True"  # the handler ran after the thread was joined
    assert not (tmp_path / "after").exists()


def test_compile_workers_start_and_stop_are_safe_without_a_pool():
    """On a torch without Triton (this CPU build) there is no pool: both calls must be harmless no-ops,
    and a compile afterwards still works."""
    from raygpt.worker.compile import CompileWorkers

    workers = CompileWorkers(enabled=True)
    workers.start()
    workers.stop_in_background()
    workers.ready_for_compile()  # joins the shutdown
    assert workers.stopping is None or not workers.stopping.is_alive()
    compiled = torch.compile(lambda x: x * 2 + 1)
    assert torch.equal(compiled(torch.arange(4.0)), torch.arange(4.0) * 2 + 1)
