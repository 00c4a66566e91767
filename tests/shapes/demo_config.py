"""The shortened ShapesWorld demo settings shared by tests/shapes/test_demo.py (its direction
run) and tests/launch/test_notebook.py (the notebook's smoke run of the demo)."""

KEYS = ("precision", "recall", "linguistic", "b_capscore", "mean_words")


def short_config(workdir):
    from configs.shapes import get_config
    c = get_config()
    c.workdir = str(workdir)
    c.compile_cache_dir = ""          # tests/conftest.py already sets a persistent cache
    c.data.num_train = 256
    c.data.num_eval = 16
    c.sft.max_steps = 60
    c.sft.warmup_steps = 5            # the full run's 50 would take most of the short run
    c.sft.chunk = 20
    c.sft.vision_pretrain_steps = 10  # the stage runs (and the tower is then frozen), briefly
    c.train.steps = 4
    return c
