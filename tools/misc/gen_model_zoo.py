"""Write README.md's model-zoo tables from the metafiles (configs/*/metafile.yml).

The tables go between ``<!-- model-zoo:start -->`` and ``<!-- model-zoo:end -->``;
``tests/test_model_index.py`` regenerates them in memory and fails when README.md
disagrees. One row per metafile model: name (linked to its config), collection, the
paper's reported results, parameters and FLOPs (``Metadata``; multiply-adds counted by
``tools/analysis_tools/get_flops.py``) and the authors' released weights
(``Converted From``) with the converter to use.

    python tools/misc/gen_model_zoo.py            # rewrite README.md
    python tools/misc/gen_model_zoo.py --check    # exit status 1 if README.md is stale
"""
import argparse
import os.path as osp
from typing import Iterable, List

from mmcbsa.model_index import CLS_TASK, SEG_TASK, load_models, model_tasks
from mmcbsa.cli import user_errors

PROG = 'gen_model_zoo.py'
REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
START, END = '<!-- model-zoo:start -->', '<!-- model-zoo:end -->'
TABLES = ((CLS_TASK, 'Top 1 Accuracy', 'top-1 (paper)'), (SEG_TASK, 'mIoU', 'mIoU (paper)'))


def _results(model, task: str, main_metric: str) -> str:
    cells = []
    for result in model.results or []:
        if result.task != task or not result.metrics:
            continue
        metrics = result.metrics
        if list(metrics) == [main_metric]:
            cells.append(f'{metrics[main_metric]}')
        else:
            cells.append('; '.join(f'{k} {v}' for k, v in metrics.items()))
    return '; '.join(cells) or '–'


def _weights(model) -> str:
    if model.weights:
        return f'[download]({model.weights})'
    source = model.data.get('Converted From')
    if not source or not source.get('Weights'):
        return '–'
    # 'tools/model_converters/x.py (...)' -> x.py; 'mmcbsa.converters.f, ...' -> f
    converter = source.get('Converter', '').split(' ')[0].rstrip(',').rsplit('/', 1)[-1]
    if not converter.endswith('.py'):
        converter = converter.rsplit('.', 1)[-1]
    return f'[official]({source["Weights"]})' + (f' → `{converter}`' if converter else '')


def _number(value, scale: float) -> str:
    return f'{value / scale:.2f}' if isinstance(value, (int, float)) and value else '–'


def render(models: Iterable, root: str) -> str:
    """The Markdown of the model-zoo tables for ``models`` (configs relative to ``root``)."""
    models = list(models)
    out: List[str] = []
    for task, main_metric, header in TABLES:
        rows = [m for m in models if task in model_tasks(m)]
        if not rows:
            continue
        out += [f'**{task}**', '',
                f'| model (config) | collection | dataset | {header} | params (M) | '
                'FLOPs (G) | official weights |',
                '|---|---|---|---|---:|---:|---|']
        for m in rows:
            config = osp.relpath(m.config, root)
            dataset = next(r.dataset for r in m.results if r.task == task)
            meta = m.metadata.data if m.metadata is not None else {}
            out.append(f'| [{m.name}]({config}) | {m.in_collection} | {dataset} | '
                       f'{_results(m, task, main_metric)} | '
                       f'{_number(meta.get("Parameters"), 1e6)} | '
                       f'{_number(meta.get("FLOPs"), 1e9)} | {_weights(m)} |')
        out.append('')
    return '\n'.join(out).rstrip('\n') + '\n'


def update(readme: str, tables: str) -> str:
    """``readme`` with the text between the markers replaced by ``tables``."""
    if readme.count(START) != 1 or readme.count(END) != 1 or \
            readme.index(START) > readme.index(END):
        raise ValueError(f'README.md must contain {START} ... {END} once')
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f'{head}{START}\n{tables}{END}{tail}'


def generate(root: str = REPO) -> str:
    """README.md of ``root`` with fresh model-zoo tables (not written)."""
    with open(osp.join(root, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    return update(readme, render(load_models(root), root))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', default=REPO, help='repository root (default: this one)')
    parser.add_argument('--check', action='store_true',
                        help='do not write; exit 1 when README.md is out of date')
    args = parser.parse_args(argv)
    with user_errors(PROG):
        fresh = generate(args.root)
        path = osp.join(args.root, 'README.md')
        with open(path, encoding='utf-8') as f:
            current = f.read()
    if args.check:
        if fresh != current:
            raise SystemExit(f'{PROG}: README.md model zoo is out of date; run '
                             f'python tools/misc/gen_model_zoo.py')
        print('README.md model zoo is up to date')
        return 0
    if fresh != current:
        with open(path, 'w', encoding='utf-8') as f:
            f.write(fresh)
        print(f'updated {path}')
    else:
        print('README.md model zoo already up to date')
    return 0


if __name__ == '__main__':
    main()
