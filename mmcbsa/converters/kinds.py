"""The released checkpoints ``official2mmcbsa`` recognises, and the sizes they hold.

Each :class:`Kind` of :data:`KINDS` is one reference layout: ``match(sd)`` tells it by
its keys and shapes; ``infer(sd, opts, extras)`` -> :class:`Recognised` reads the sizes
off the tensors (the others are given or official); ``convert(sd, sizes)`` -> ``(renamed,
{unused key: why})`` (:mod:`~mmcbsa.converters.renames`); ``releases(sizes)`` names the
committed ``configs/`` files to inherit, best first (the release of these sizes, then the
kind's small release); ``model(sizes)`` is the model settings the sizes fix.

Not stored in the weights (official value): MSSA's head width (64; CBSA / TSSA store
per-head steps), DEPICT's head width (100), CBSA representatives (classifier 64, CBT
decoder 100), MiTA-DeiT's and a Segmenter encoder's heads (``d / 64``), MiTA's
``pool_size`` and ``kv_topk`` (5, or the checkpoint's ``args``; +DWC routes
``pool_size²``), Primal's ``rank_multi`` (read when fewer than all tokens are sampled,
else 10).
"""
from typing import Dict, Mapping, Optional

from torch import Tensor

from . import renames as R
from .checkpoint_io import ConversionError
from .sizes import (ConvertOptions, Recognised, call_renames, chosen, need, resolve_heads,
                    square_grid)

__all__ = ['ConvertOptions', 'Recognised', 'Kind', 'KINDS', 'recognise']

# the classifier of mmpretrain's DeiT configs (VisionTransformerClsHead), which the
# Primal and MiTA releases inherit
DEIT_HEAD = 'head.layers.head.'
# (embed_dims, num_layers, num_heads) of the released sizes, as the config files name them
SIZE_NAMES = {(192, 12, 3): 'tiny', (384, 12, 6): 'small', (768, 12, 12): 'base',
              (1024, 24, 16): 'large'}
_LEGACY = dict(layer_cfgs=dict(attn_cfg=dict(legacy_pooling=True)))


class Kind:
    """One released-checkpoint layout (methods: see the module docstring).

    Attributes:
        name / title: printed, and recorded in the converted checkpoint's ``meta``.
        scope: ``'mmpretrain'`` or ``'mmseg'``: the registry the model is built in.
        options: :class:`ConvertOptions` fields this kind reads; others are refused.
        release: the release config, ``{size}`` (``{initial}``, ``{crop}``) for its size.
        expected_missing: model key prefixes a checkpoint of this kind does not fill,
            with the reason (the encoder of a decoder-only checkpoint).
    """
    name = title = release = ''
    scope = 'mmpretrain'
    options: frozenset = frozenset()
    expected_missing: Dict[str, str] = {}

    def check_options(self, opts: ConvertOptions) -> None:
        """Refuse options this kind does not read (:class:`ConversionError`)."""
        extra = sorted(set(opts.given()) - set(self.options))
        if extra:
            flags = ', '.join(ConvertOptions.flag(n) for n in extra)
            reads = ', '.join(sorted(ConvertOptions.flag(n) for n in self.options))
            raise ConversionError(f'{flags} does not apply to a {self.name} checkpoint '
                                  f'(it reads: {reads or "no option"})')

    def size_name(self, sizes: Mapping) -> Optional[str]:
        return SIZE_NAMES.get((sizes['embed_dims'], sizes['num_layers'], sizes['num_heads']))

    def releases(self, sizes: Mapping) -> list:
        return list(dict.fromkeys(self.release.format(
            size=n, initial=n[0], crop='640x640' if n == 'large' else '512x512')
            for n in (self.size_name(sizes), 'small') if n))


class WhiteBoxClassifier(Kind):
    """CBSA repository classifiers (``models.VisionTransformer``: conv stem + ``[attention,
    ISTA]`` blocks + LN/Linear head; docs/mechanisms.md §1, §2)."""
    _A = 'transformer.layers.0.0.fn.'
    _PER_HEAD = {'CBSA': 'step_rep', 'TSSA': 'temp'}  # MSSA stores no per-head tensor

    def __init__(self, attn: str, family: str, label: str) -> None:
        self.attn, self.family, self.name = attn, family, f'{family}-classifier'
        self.title = (f'{label} classifier: conv stem + [{attn}, ISTA] blocks '
                      f'(docs/mechanisms.md §{1 if attn == "CBSA" else 2})')
        self.options = frozenset({'head_dims', 'num_heads'} |
                                 ({'num_reps'} if attn == 'CBSA' else set()))
        self.release = f'{family}/{family}-{{size}}_8xb32-lion-150e_in1k.py'

    def match(self, sd):
        if 'to_patch_embedding.proj.0.0.weight' not in sd:
            return False
        rep, temp = self._A + 'step_rep' in sd, self._A + 'temp' in sd
        return {'CBSA': rep, 'TSSA': temp and not rep,
                'MSSA': self._A + 'qkv.weight' in sd and not rep and not temp}[self.attn]

    def infer(self, sd, opts, extras):
        a, cbsa = self._A, self.attn == 'CBSA'
        per_head = a + self._PER_HEAD[self.attn] if self.attn in self._PER_HEAD else None
        read = int(need(sd, per_head).shape[0]) if per_head else None
        if cbsa and need(sd, a + 'step_x').shape[0] != read:
            raise ConversionError(f'{a}step_rep and {a}step_x disagree on the head count '
                                  f'({read} vs {sd[a + "step_x"].shape[0]})')
        rows_key = a + ('proj.weight' if cbsa else 'qkv.weight')
        heads, p, why = resolve_heads(int(need(sd, rows_key).shape[0]), rows_key, opts, 64,
                                      read, per_head)
        dim, patch = int(need(sd, 'cls_token').shape[-1]), 2 ** len(R.stem_indices(sd))
        side = square_grid(int(need(sd, 'pos_embedding').shape[1]), 'pos_embedding', dim)
        rec = Recognised(dict(embed_dims=dim, num_layers=R.layer_count(sd), num_heads=heads,
                              head_dims=p, img_size=side * patch, patch_size=patch,
                              num_classes=int(need(sd, 'mlp_head.1.weight').shape[0])))
        if why:
            rec.defaults['num_heads, head_dims'] = why
        if cbsa:
            rec.sizes['num_reps'] = chosen(rec, 'num_reps', opts, 64,
                                           'the official 8x8 representatives')
        return rec

    def convert(self, sd, sizes):
        return call_renames(R.convert_white_box_vit, sd, self.attn), {}

    def model(self, s):
        attn = dict(head_dims=s['head_dims'], **({'num_reps': s['num_reps']}
                                                 if 'num_reps' in s else {}))
        arch = dict(base=f'{self.family}-small', embed_dims=s['embed_dims'],
                    num_layers=s['num_layers'], num_heads=s['num_heads'], attn_cfg=attn)
        backbone = dict(arch=arch, img_size=s['img_size'], patch_size=s['patch_size'],
                        **(_LEGACY if self.attn == 'CBSA' else {}))
        return dict(backbone=backbone,
                    head=dict(num_classes=s['num_classes'], in_channels=s['embed_dims']))


def _is_timm_vit(sd: Mapping[str, Tensor]) -> bool:
    return 'patch_embed.proj.weight' in sd and 'cls_token' in sd and 'blocks.0.norm1.weight' in sd


def _timm_sizes(sd: Mapping[str, Tensor]) -> dict:
    """Sizes of a timm-layout ViT read off its tensors (mmcbsa names)."""
    dim = int(need(sd, 'cls_token').shape[-1])
    patch = need(sd, 'patch_embed.proj.weight')
    if patch.ndim != 4 or patch.shape[-1] != patch.shape[-2] or patch.shape[0] != dim:
        raise ConversionError(f'patch_embed.proj.weight has shape {tuple(patch.shape)}: not a '
                              f'square patch convolution to the {dim} channels of cls_token')
    side = square_grid(int(need(sd, 'pos_embed').shape[1]), 'pos_embed', dim)
    return dict(embed_dims=dim, num_layers=R.layer_count(sd, R.TIMM_BLOCK),
                img_size=side * int(patch.shape[-1]), patch_size=int(patch.shape[-1]),
                mlp_ratio=int(need(sd, 'blocks.0.mlp.fc1.weight').shape[0]) / dim,
                num_classes=int(sd['head.weight'].shape[0]) if 'head.weight' in sd else None)


def _deit_model(base: str, s: Mapping, attn: dict, **arch) -> dict:
    return dict(backbone=dict(arch=dict(base=base, embed_dims=s['embed_dims'],
                                        num_layers=s['num_layers'], num_heads=s['num_heads'],
                                        mlp_ratio=s['mlp_ratio'], attn_cfg=attn, **arch),
                              img_size=s['img_size'], patch_size=s['patch_size']),
                head=dict(num_classes=s['num_classes'], in_channels=s['embed_dims']))


def _rank_multi(n: int, rank: int, tokens: int, given: Optional[int], key: str):
    """Primal's samples per rank ``R`` from ``n = min(N, s·R)`` sampled positions
    (docs/mechanisms.md §6.2): ``(R, why)``, ``why`` None when read."""
    if given is None and n < tokens and n % rank == 0:
        return n // rank, None
    if given is None and n == tokens and rank * 10 >= tokens:
        return 10, (f'10, the official value ({key} samples all {tokens} tokens, so the '
                    'weights cannot tell; --rank-multi to change)')
    if given is not None and n == min(tokens, rank * given):
        return given, f'{given}, given (--rank-multi; checked against the sample count of {key})'
    if given is None:
        raise ConversionError(f'{key} samples n = {n} of N = {tokens} tokens with rank '
                              f's = {rank}: give --rank-multi R with n = min(N, s*R)')
    hint = f' (the tensors say --rank-multi {n // rank})' if n % rank == 0 and n < tokens \
        else ''
    raise ConversionError(f'--rank-multi {given} gives n = min({tokens}, {rank}*{given}) = '
                          f'{min(tokens, rank * given)} sampled positions, but {key} has '
                          f'n = {n}{hint}')


class PrimalClassifier(Kind):
    """Primal-Attention classifiers (PrimalAttention repository ``models_primal.py`` /
    ``models_combo.py``: timm ViTs; docs/mechanisms.md §6)."""
    options = frozenset({'num_heads', 'head_dims', 'rank_multi'})

    def __init__(self, former: bool) -> None:
        self.former = former
        self.name = 'primalformer' if former else 'primal-deit'
        self.title = ('PrimalFormer: every block Primal-Attention (docs/mechanisms.md §6)'
                      if former else 'Primal.+DeiT: timm DeiT whose last blocks use '
                      'Primal-Attention (docs/mechanisms.md §6)')
        self.release = f'primal/{self.name}-small_4xb256_in1k.py'

    def match(self, sd):
        if not _is_timm_vit(sd):
            return False
        depth = R.layer_count(sd, R.TIMM_BLOCK)
        primal = [i for i in range(depth) if f'blocks.{i}.attn.we' in sd]
        return bool(primal) and (len(primal) == depth) == self.former

    def infer(self, sd, opts, extras):
        """Heads and ranks from ``attn.we`` ``(H, n, s)``; ``rank_multi`` from ``n``."""
        s = _timm_sizes(sd)
        depth, tokens = s['num_layers'], (s['img_size'] // s['patch_size']) ** 2 + 1
        primal = [i for i in range(depth) if f'blocks.{i}.attn.we' in sd]
        if primal != list(range(depth - len(primal), depth)):
            raise ConversionError(f'Primal blocks {primal} are not the last num_ksvd_layer='
                                  f'{len(primal)} of depth={depth}')
        shapes = [tuple(int(v) for v in sd[f'blocks.{i}.attn.we'].shape) for i in primal]
        heads, _, _ = resolve_heads(s['embed_dims'], 'the embedding width (cls_token)', opts,
                                    64, shapes[0][0], f'blocks.{primal[0]}.attn.we')
        if any(h != heads for h, _, _ in shapes):
            raise ConversionError(f'Primal blocks disagree on the head count {shapes}')
        multis = {_rank_multi(n, rank, tokens, opts.rank_multi, f'blocks.{i}.attn.we')
                  for i, (_, n, rank) in zip(primal, shapes)}
        if len({m for m, _ in multis}) != 1:
            raise ConversionError(f'Primal blocks {primal} imply different rank_multi values '
                                  f'{sorted(m for m, _ in multis)}')
        ranks = [rank for _, _, rank in shapes]
        if not self.former and len(set(ranks)) != 1:
            raise ConversionError(f'Primal blocks {primal} have different low ranks {ranks}; '
                                  'only PrimalFormer gives one per block')
        multi, why = multis.pop()
        rec = Recognised(dict(s, num_heads=heads, rank_multi=multi,
                              low_rank=ranks if self.former else ranks[0],
                              num_tail_layers=len(primal),
                              qkv_bias='blocks.0.attn.qkv.bias' in sd,
                              qk_bias=f'blocks.{primal[0]}.attn.qk.bias' in sd))
        if why:
            rec.defaults['rank_multi'] = why
        return rec

    def convert(self, sd, sizes):
        return call_renames(R.convert_timm_vit, sd, R.convert_primal_block_attention, '',
                            DEIT_HEAD), {}

    def model(self, s):
        ranks = s['low_rank'] if self.former else [s['low_rank']]
        primal = dict(type='PrimalAttention', low_rank=ranks[0], rank_multi=s['rank_multi'],
                      qk_bias=s['qk_bias'])
        if not self.former:
            return _deit_model('primal-deit-small', s, dict(type='MHSA', qkv_bias=s['qkv_bias']),
                               num_tail_layers=s['num_tail_layers'], tail_attn_cfg=primal)
        model = _deit_model('primalformer-small', s, primal)
        if len(set(ranks)) > 1:  # one rank per block
            model['backbone']['layer_cfgs'] = [
                {} if r == ranks[0] else dict(attn_cfg=dict(low_rank=r)) for r in ranks]
        return model


class MiTADeiT(Kind):
    """MiTA-DeiT classifiers (MiTA repository ``MiTA-DeiT/main.py``; docs/mechanisms.md
    §5): timm DeiT blocks whose attention is ``MiTA_Attention`` (``qkv``, ``proj``),
    ``MiTA_Attention_Conv`` (``+ dwc``) or ``MiTA_Attention_Conv_Gate`` (``qkvg``)."""
    options = frozenset({'num_heads', 'head_dims', 'pool_size', 'kv_topk'})

    def __init__(self, dwc: bool, gate: bool = False) -> None:
        self.dwc, self.gate = dwc, gate
        self.name = 'mita-dwc-gate-deit' if gate else ('mita-dwc-deit' if dwc else 'mita-deit')
        self.title = ('MiTA-DeiT ' + ('+DWC,Gate' if gate else '+DWC' if dwc else '') +
                      ': timm DeiT with Mixture-of-Top-k Attention (docs/mechanisms.md §5)')
        self.release = f'mita/{self.name}-{{size}}_4xb256_in1k.py'

    def match(self, sd):
        if not _is_timm_vit(sd) or any(k.endswith('.attn.we') for k in sd):
            return False
        qkv, cls = sd.get('blocks.0.attn.qkv.weight'), sd['cls_token']
        gate = any(k.endswith('.attn.qkvg.weight') for k in sd) or (
            qkv is not None and qkv.shape[0] == 4 * cls.shape[-1])
        dwc = any(k.endswith('.attn.dwc.weight') for k in sd)
        return gate == self.gate and (gate or dwc == self.dwc)

    def infer(self, sd, opts, extras):
        s = _timm_sizes(sd)
        dim, depth = s['embed_dims'], s['num_layers']
        with_dwc = [i for i in range(depth) if f'blocks.{i}.attn.dwc.weight' in sd]
        if with_dwc and len(with_dwc) != depth:
            raise ConversionError(f'only blocks {with_dwc} of {depth} have attn.dwc: '
                                  'MiTA-DeiT +DWC has it in every block')
        proj_in, width = ('qkvg', 4) if self.gate else ('qkv', 3)
        qkv = need(sd, f'blocks.0.attn.{proj_in}.weight')
        if tuple(qkv.shape) != (width * dim, dim):
            raise ConversionError(f'blocks.0.attn.{proj_in}.weight has shape '
                                  f'{tuple(qkv.shape)}, expected ({width}*{dim}, {dim})')
        heads, _, why = resolve_heads(dim, f'the embedding width (cls_token, {dim})', opts, 64)
        rec = Recognised(dict(s, num_heads=heads, qkv_bias=f'blocks.0.attn.{proj_in}.bias' in sd,
                              proj_bias='blocks.0.attn.proj.bias' in sd))
        rec.defaults['num_heads'] = why
        args = extras.get('args') if not self.dwc else None
        pool = chosen(rec, 'pool_size', opts, 5, 'the official value',
                      getattr(args, 'pool_size', None))
        if self.dwc and opts.kv_topk is None:
            topk = pool * pool
            rec.defaults['routed keys'] = (f'{topk} = pool_size^2, fixed by MiTA_Attention_Conv '
                                           '(--kv-topk to change)')
        else:
            topk = chosen(rec, 'kv_topk', opts, 5, 'the official value',
                          getattr(args, 'kv_topk', None)) ** 2
        if not self.dwc and args is None:
            rec.notes.append('a timm DeiT without DWC holds the same tensors as MiTA-DeiT; '
                             'converted as MiTA-DeiT')
        rec.sizes.update(num_landmarks=pool * pool, topk=topk)
        return rec

    def convert(self, sd, sizes):
        return call_renames(R.convert_timm_vit, sd, R.convert_mita_attention, '', DEIT_HEAD), {}

    def model(self, s):
        attn = dict(num_landmarks=s['num_landmarks'], topk=s['topk'], qkv_bias=s['qkv_bias'],
                    proj_bias=s['proj_bias'], dwc=self.dwc, gate=self.gate)
        model = _deit_model('mita-deit-small-dwc-gate' if self.gate else 'mita-deit-small',
                            s, attn)
        model['backbone'].update(_LEGACY)
        return model


class SegmenterKind(Kind):
    """Segmenter-style checkpoints (DEPICT repository; CBSA repository
    ``CBSA_semantic_segmentation``): ``encoder.*`` (Segmenter's timm ViT) and
    ``decoder.*`` (DEPICT-SA / -CA / CBT decoder, docs/mechanisms.md §3, §4), or the
    decoder alone -> mmseg ``EncoderDecoder`` (mmseg ``VisionTransformer`` through
    mmseg's ``vit2mmseg``, ``DEPICTHead`` / ``CBTHead``). Segmenter's encoder differs
    from mmseg's Segmenter configs in three settings the written config sets: LayerNorm
    eps 1e-5, a biased patch convolution, bilinear position-embedding resizing."""
    scope = 'mmseg'
    _HEAD_KEY = {'depict-sa': 'net.layers.0.fn.proj', 'depict-ca': 'snet.layers.0.fn.proj',
                 'cbt': 'net.layers.0.fn.proj.weight'}

    def __init__(self, head: str, full: bool) -> None:
        self.head, self.full = head, full
        self.name = f"{head}-{'segmenter' if full else 'decoder'}"
        label = {'depict-sa': 'DEPICT-SA', 'depict-ca': 'DEPICT-CA', 'cbt': 'CBT'}[head]
        where = f'(docs/mechanisms.md {"§4" if head == "cbt" else "§3"})'
        self.title = (f'Segmenter ViT encoder + {label} decoder {where}' if full
                      else f'{label} decoder alone {where}')
        self.options = frozenset({'num_heads', 'head_dims'} | (
            {'num_reps'} if head == 'cbt' else set()) | ({'encoder_num_heads'} if full else set()))
        self.expected_missing = {} if full else {
            'backbone.': 'the encoder is not in this checkpoint (decoder only)'}
        folder, name = ('cbt', 'cbt-head') if head == 'cbt' else ('depict', head)
        self.release = f'{folder}/{name}_vit-{{initial}}_mask_8xb1-160k_ade20k-{{crop}}.py'

    @staticmethod
    def _prefix(sd) -> str:
        return 'decoder.' if any(k.startswith('decoder.') for k in sd) else ''

    def match(self, sd):
        if any(k.startswith('encoder.') for k in sd) != self.full:
            return False
        prefix = self._prefix(sd)
        return bool(prefix or not self.full) and prefix + self._HEAD_KEY[self.head] in sd

    def _decoder(self, sd, prefix, opts, rec: Recognised) -> dict:
        cls_emb = need(sd, prefix + 'cls_emb')
        head = dict(num_classes=int(cls_emb.shape[1]), in_channels=int(cls_emb.shape[2]),
                    channels=int(cls_emb.shape[2]))
        stack = 'snet' if self.head == 'depict-ca' else 'net'
        rows_key = prefix + self._HEAD_KEY[self.head]
        read = need(sd, f'{prefix}net.layers.0.fn.step_x').shape[0] \
            if self.head == 'cbt' else None
        heads, p, why = resolve_heads(int(need(sd, rows_key).shape[0]), rows_key, opts, 100,
                                      read, f'{prefix}net.layers.0.fn.step_x')
        if why:
            rec.defaults['num_heads, head_dims'] = why
        head.update(num_layers=R.stack_layers(sd, prefix, stack), num_heads=heads,
                    head_dims=p)
        if self.head == 'cbt':
            head.update(num_reps=chosen(rec, 'num_reps', opts, 100,
                                        'the official 10x10 representatives'))
        else:
            head['mode'] = self.head[-2:]
        if self.head == 'depict-ca':
            ca_key = f'{prefix}cnet.layers.0.fn.proj'
            ca_rows = int(need(sd, ca_key).shape[0])
            if ca_rows % heads:
                raise ConversionError(f'{ca_key} has {ca_rows} rows, not a multiple of the '
                                      f'{heads} heads of {rows_key}')
            head.update(ca_num_layers=R.stack_layers(sd, prefix, 'cnet'),
                        ca_num_heads=heads, ca_head_dims=ca_rows // heads)
        return head

    def _encoder(self, sd, opts, rec: Recognised, width: int) -> dict:
        s = call_renames(_timm_sizes, R.strip_prefix(sd, 'encoder.'))
        dim = s['embed_dims']
        if dim != width:
            raise ConversionError(f'the encoder is {dim} wide (encoder.cls_token) but the '
                                  f'decoder reads {width}-wide tokens (decoder.cls_emb)')
        heads, _, why = resolve_heads(dim, f'the encoder width (encoder.cls_token, {dim})',
                                      opts, 64, heads_flag='encoder_num_heads', dims_flag=None)
        rec.defaults['encoder num_heads'] = why
        if s['mlp_ratio'] != int(s['mlp_ratio']):
            raise ConversionError(f"the encoder MLP is {int(s['mlp_ratio'] * dim)} wide, not a "
                                  f"multiple of its width {dim}: mmseg's VisionTransformer "
                                  'cannot express it')
        return dict(img_size=(s['img_size'], s['img_size']), patch_size=s['patch_size'],
                    embed_dims=dim, num_layers=s['num_layers'], num_heads=heads,
                    mlp_ratio=int(s['mlp_ratio']))

    def infer(self, sd, opts, extras):
        rec = Recognised({})
        head = rec.sizes['decode_head'] = self._decoder(sd, self._prefix(sd), opts, rec)
        if self.full:
            rec.sizes['backbone'] = self._encoder(sd, opts, rec, head['in_channels'])
        else:
            rec.notes.append(
                "the checkpoint holds no encoder: the config's encoder (the release's, of "
                "the decoder's width) is not the one this decoder was trained on; set that "
                'encoder and its weights before testing')
        return rec

    def convert(self, sd, sizes):
        fn = R.convert_cbt_decoder if self.head == 'cbt' else R.convert_depict
        why = "Segmenter encoder's classification head (mmseg's ViT has none)"
        unused = {f'encoder.{k}': why for k in R.strip_prefix(sd, 'encoder.')
                  if k.startswith(R.ENCODER_DROPPED)}
        if self._prefix(sd):
            return call_renames(R.convert_segmenter, sd, fn), unused
        return call_renames(fn, sd, '', 'decode_head.'), unused

    def size_name(self, sizes):
        if self.full:
            return super().size_name(sizes['backbone'])
        d = sizes['decode_head']['in_channels']
        return next((n for (dim, _, _), n in SIZE_NAMES.items() if dim == d), None)

    def model(self, s):
        head = s['decode_head']
        if self.full:
            backbone = dict(s['backbone'], patch_bias=True, norm_cfg=dict(eps=1e-5),
                            interpolate_mode='bilinear')
            return dict(pretrained=None, backbone=backbone, decode_head=head)
        # a placeholder encoder of the decoder's width (Segmenter's head width 64)
        d = head['in_channels']
        heads = max(h for h in range(1, max(1, d // 64) + 1) if d % h == 0)
        return dict(backbone=dict(embed_dims=d, num_heads=heads), decode_head=head)


_OUT = {'to_out.weight', 'to_out.bias'}
_ATTENTION_MODULES = (  # (what, its converter, its exact keys or (fewest, most))
    ('a CBSA attention module', "convert_attention('cbsa', ...)",
     {'proj.weight', 'step_rep', 'step_x'} | _OUT),
    ('an MSSA attention module', "convert_attention('mssa', ...)", {'qkv.weight'} | _OUT),
    ('a TSSA attention module', "convert_attention('tssa', ...)", {'qkv.weight', 'temp'} | _OUT),
    ("a softmax-layout attention module (qkv, proj: ViT, MiTA or the CBSA repository's "
     'ViT-adaptation attention)', 'convert_mita_attention',
     ({'qkv.weight', 'proj.weight'},
      {'qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias', 'dwc.weight', 'dwc.bias'})))


KINDS: Dict[str, Kind] = {k.name: k for k in (
    WhiteBoxClassifier('CBSA', 'cbt', 'CBT'), WhiteBoxClassifier('MSSA', 'crate', 'CRATE'),
    WhiteBoxClassifier('TSSA', 'tost', 'ToST'),
    PrimalClassifier(former=False), PrimalClassifier(former=True),
    MiTADeiT(dwc=False), MiTADeiT(dwc=True), MiTADeiT(dwc=True, gate=True),
    *(SegmenterKind(h, full) for full in (True, False) for h in ('depict-sa', 'depict-ca', 'cbt')))}


def _summary(state_dict: Mapping[str, Tensor], limit: int = 4) -> str:
    tops: Dict[str, int] = {}
    for key in state_dict:
        tops[key.split('.')[0]] = tops.get(key.split('.')[0], 0) + 1
    names = ', '.join(f'{t} ({n})' for t, n in list(tops.items())[:8])
    if len(tops) > 8:
        names += f', ... ({len(tops)} names)'
    examples = ', '.join(f'{k} {tuple(v.shape)}' for k, v in list(state_dict.items())[:limit])
    return f'{len(state_dict)} tensors under {names}; first: {examples}'


def recognise(state_dict: Mapping[str, Tensor]) -> Kind:
    """The one kind of :data:`KINDS` whose predicate holds (else
    :class:`ConversionError` saying what was seen: a single attention module is refused
    with its converter's name)."""
    found = [kind for kind in KINDS.values() if kind.match(state_dict)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConversionError(f'ambiguous checkpoint: it matches the kinds '
                              f'{[k.name for k in found]} ({_summary(state_dict)})')
    keys = set(state_dict)
    for what, fn, ks in _ATTENTION_MODULES:
        if ks[0] <= keys <= ks[1] if isinstance(ks, tuple) else keys == ks:
            raise ConversionError(
                f'holds {what} ({len(keys)} tensors: {", ".join(sorted(keys))}), not a '
                'released model checkpoint; attention modules are converted in Python '
                f'(mmcbsa.converters: {fn})')
    hint = ' -- it looks like an mmcbsa / OpenMMLab checkpoint already: use it with its ' \
        'config directly' if any(k.startswith(('backbone.', 'decode_head.')) for k in keys) else ''
    raise ConversionError(f'unknown kind of checkpoint: {_summary(state_dict)}{hint}; '
                          f'known kinds: {", ".join(KINDS)}')
