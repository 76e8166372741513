"""What a trial process and the served model load beyond `import torch, mlflow` (mlflow itself brings pandas and
scipy): the analysis stack never (statsmodels, optuna), matplotlib only at a trial's run's end (its loss curve) and
never in the served model. Every trial and every model server pays for each import.
"""

import json
import subprocess
import sys

# a real `nanosweep train`, with the modules noted when training starts (train_fused is called) and at exit
PROBE = """
import atexit, json, runpy, sys
import torch, mlflow
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).step()  # what torch loads on its first use (dynamo, sympy)
baseline = set(sys.modules)
import nanosweep.train
start = []
def noting_start(*args, _train_fused=nanosweep.train.train_fused, **kwargs):
    start.extend(set(sys.modules) - baseline)
    return _train_fused(*args, **kwargs)
nanosweep.train.train_fused = noting_start
report = lambda: {"baseline": sorted(baseline), "start": sorted(start), "end": sorted(set(sys.modules) - baseline)}
atexit.register(lambda: print(json.dumps(report())))
sys.argv = ["nanosweep", "train", *sys.argv[1:]]
runpy.run_module("nanosweep", run_name="__main__")
"""
NEVER = ("statsmodels", "optuna")  # the analysis stack (nanosweep.analysis.stats) and the search's
TINY = "--block-size 32 --n-layer 2 --n-head 2 --n-embd 32 --batch-size 4 --gradient-accumulation-steps 1 "
TINY += "--max-iters 10 --eval-interval 10 --eval-iters 2 --warmup-iters 5 --num-samples 1 --max-new-tokens 20 "
TINY += "--device cpu"
# matplotlib and what it loads: Pillow, its layout and font libraries, the standard library's XML and plist readers
MATPLOTLIB = {"matplotlib", "mpl_toolkits", "PIL", "kiwisolver", "cycler", "pyparsing", "contourpy", "fontTools"}
MATPLOTLIB |= {"dateutil", "xml", "pyexpat", "plistlib"}


def top_level(modules: list[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_a_trial_process_loads_no_analysis_stack_and_matplotlib_only_at_its_runs_end(store):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *TINY.split()], capture_output=True, text=True, timeout=300, check=True
    )
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    libraries = top_level(loaded["baseline"]) - {"nanosweep"}  # torch's and mlflow's own later loads are theirs
    start, end = ([m for m in loaded[k] if m.split(".")[0] not in libraries] for k in ("start", "end"))
    assert start, "the probe saw training start"
    assert not [m for m in end if m.startswith(NEVER)], [m for m in end if m.startswith(NEVER)]
    assert not top_level(start) & MATPLOTLIB
    assert top_level(set(end) - set(start)) - top_level(start) <= MATPLOTLIB | {"nanosweep"}  # the run's end
    assert "nanosweep.loss_curve" in end and not {"nanosweep.analysis.stats", "nanosweep.analysis.plots"} & set(end)


SERVED = """
import json, sys
import torch, mlflow
baseline = set(sys.modules)
import nanosweep.models.textgen  # what `mlflow models serve` runs to load the model (models from code)
print(json.dumps(sorted(set(sys.modules) - baseline)))
"""


def test_the_served_model_loads_no_analysis_stack_search_or_matplotlib():
    done = subprocess.run([sys.executable, "-c", SERVED], capture_output=True, text=True, timeout=300, check=True)
    loaded = top_level(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "nanosweep" in loaded, "the probe loaded the served model's code"
    assert not loaded & {*NEVER, *MATPLOTLIB}, sorted(loaded & {*NEVER, *MATPLOTLIB})
