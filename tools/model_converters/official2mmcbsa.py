"""Convert a released checkpoint of the papers mmcbsa implements, whatever its kind.

    python tools/model_converters/official2mmcbsa.py SRC DST [--head-dims P] ...

recognises the kind from the checkpoint's own keys and shapes (CBT / CRATE / ToST
classifiers of any size, Primal.+DeiT, PrimalFormer, MiTA-DeiT with or without DWC,
DEPICT-SA / DEPICT-CA / CBT segmentation models -- Segmenter encoder plus decoder, or
the decoder alone --, wrapped in ``model`` / ``state_dict`` or not, with ``module.``
prefixes or not), and writes

- ``DST``: the converted mmengine checkpoint (``state_dict`` + ``meta``: source file,
  kind, config);
- ``DST`` with ``.py`` (``out/cbt.pth`` -> ``out/cbt.py``): a short config that
  inherits the committed config of the released model (``configs/``) and overrides
  what this checkpoint changes, so that ``python tools/test.py out/cbt.py out/cbt.pth``
  runs.

It prints what it recognised, the sizes it read and those it had to assume, the config
it wrote, every source key it did not use and every model key it did not fill.

Sizes the tensors cannot tell take the official architecture's value; change them
with the options below (a value that contradicts the tensors is refused). The kinds and
their official values are listed in ``mmcbsa/converters/kinds.py``.

Exit status: 0 converted; 2 input refused (unreadable, truncated, not weights-only or
unknown file, impossible or contradictory sizes, options that do not apply) -- one line
on stderr, no traceback; 1 no release config to inherit (a broken install: please report).
"""
import argparse
import os
import os.path as osp
import sys

from mmcbsa.converters import (ConversionError, ConversionFailed, ConvertOptions,
                               convert_official_checkpoint)

PROG = 'official2mmcbsa'


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too."""

    def error(self, message):
        self.exit(2, f'{PROG}: error: {message} (see --help)\n')


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description=__doc__.split('\n\n')[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('src', help='released checkpoint (.pth)')
    parser.add_argument('dst', help='converted checkpoint to write (.pth); the config is '
                        'written next to it with .py')
    sizes = parser.add_argument_group('sizes the weights do not store')
    sizes.add_argument('--head-dims', type=int, metavar='P',
                       help='head width of the main attention (MSSA/CRATE: default 64; '
                       'DEPICT decoders: 100; MiTA-DeiT: 64)')
    sizes.add_argument('--num-heads', type=int, metavar='H',
                       help='head count of the main attention (checked against the '
                       'tensors where they store it: CBSA, TSSA, CBT decoder, Primal)')
    sizes.add_argument('--encoder-num-heads', type=int, metavar='H',
                       help='heads of a Segmenter ViT encoder (default: width / 64)')
    sizes.add_argument('--num-reps', type=int, metavar='M',
                       help='CBSA representatives (CBT classifier: 64; CBT decoder: 100)')
    sizes.add_argument('--rank-multi', type=int, metavar='R',
                       help='Primal-Attention samples per rank (read from attn.we when it '
                       'samples fewer than all tokens; else 10)')
    sizes.add_argument('--pool-size', type=int, metavar='P',
                       help="MiTA landmark grid side, P*P landmarks (default 5, or the "
                       "checkpoint's args.pool_size)")
    sizes.add_argument('--kv-topk', type=int, metavar='K',
                       help="MiTA routed keys K*K per landmark (default 5, or the "
                       "checkpoint's args.kv_topk; +DWC: pool-size squared)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = ConvertOptions(
        head_dims=args.head_dims, num_heads=args.num_heads,
        encoder_num_heads=args.encoder_num_heads, num_reps=args.num_reps,
        rank_multi=args.rank_multi, pool_size=args.pool_size, kv_topk=args.kv_topk)
    folder = osp.dirname(osp.abspath(args.dst))
    try:  # where DST and its config go: a user's mistake, not a bug (exit status 2)
        if osp.exists(folder) and not osp.isdir(folder):
            raise NotADirectoryError(None, 'a file, not a directory', folder)
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f'not writable: {folder}')
    except OSError as e:
        print(f'{PROG}: error: cannot write DST {args.dst}: {e.strerror or e}'
              f'{"" if e.strerror is None else f": {e.filename}"}', file=sys.stderr)
        return 2
    try:
        report = convert_official_checkpoint(args.src, args.dst, options)
    except ConversionError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 2
    except ConversionFailed as e:
        print(f'{PROG}: conversion failed (please report): {e}',
              file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
