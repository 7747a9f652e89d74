"""The package's shape (docs/architecture.md), checked on its source: files stay short,
no module reaches into another's private names, and no layer imports one above it
(ops -> models -> analysis / converters -> tools)."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'mmcbsa'
SOURCES = sorted(PACKAGE.rglob('*.py')) + sorted((REPO / 'tools').rglob('*.py'))
# the layers each layer must not import (it may import those below it)
BELOW = {'ops': ('models', 'analysis', 'converters', 'deployment', 'engine'),
         'models': ('analysis', 'converters', 'deployment'),
         'converters': ('analysis', 'deployment'),
         'engine': ('ops', 'models', 'analysis', 'converters', 'deployment')}
# issue 15's budget: the converters are rename tables plus the size reading around them
CONVERTERS_MAX_LINES = 1200


def _module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix('')
    parts = list(rel.parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path):
    """``(line, module, name, bound)`` for every ``from M import name`` and ``import M``
    of mmcbsa (relative imports resolved; ``bound``: the name it binds)."""
    tree = ast.parse(path.read_text())
    package = _module_of(path) if path.name == '__init__.py' else \
        _module_of(path).rpartition('.')[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parent = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(parent + ([node.module] if node.module else []))
            if base.startswith('mmcbsa'):
                for alias in node.names:
                    yield node.lineno, base, alias.name, alias.asname or alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('mmcbsa'):
                    yield node.lineno, alias.name, None, alias.asname


def test_the_converters_stay_within_their_budget():
    lines = {p.name: p.read_text().count('\n') for p in (PACKAGE / 'converters').glob('*.py')}
    assert sum(lines.values()) <= CONVERTERS_MAX_LINES, (
        f'mmcbsa/converters/ is {sum(lines.values())} lines (budget {CONVERTERS_MAX_LINES}): '
        f'{lines}; share a rule with mmcbsa.engine or renames.py instead of adding one')


def test_no_file_in_the_package_is_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in sorted(PACKAGE.rglob('*.py'))
            if (n := p.read_text().count('\n')) > 600}
    assert not long, f'split these files (> 600 lines): {long}'


def test_no_private_name_is_imported_or_called_across_modules():
    found = []
    for path in SOURCES:
        imported = set()
        for line, module, name, bound in _imports(path):
            if name is not None and name.startswith('_') and not name.startswith('__'):
                found.append(f'{path.relative_to(REPO)}:{line}: from {module} import {name}')
            imported.add(bound)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in imported and node.attr.startswith('_') and \
                    not node.attr.startswith('__'):
                found.append(f'{path.relative_to(REPO)}:{node.lineno}: '
                             f'{node.value.id}.{node.attr}')
    assert not found, 'private names used across modules:\n' + '\n'.join(found)


@pytest.mark.parametrize('layer', sorted(BELOW))
def test_no_layer_imports_a_layer_above_it(layer):
    found = []
    for path in sorted((PACKAGE / layer).rglob('*.py')):
        for line, module, name, _ in _imports(path):
            parts = module.split('.') + ([name] if name else [])
            if len(parts) > 1 and parts[0] == 'mmcbsa' and parts[1] in BELOW[layer]:
                found.append(f'{path.relative_to(REPO)}:{line}: imports {module}'
                             + (f'.{name}' if name else ''))
    assert not found, f'mmcbsa/{layer} imports a layer above it:\n' + '\n'.join(found)
