"""The released checkpoints ``official2mmcbsa`` recognises, and the sizes they hold.

A :class:`Kind` is one reference layout (``KINDS``: ``cbt-`` / ``crate-`` /
``tost-classifier``, ``primal-deit``, ``primalformer``, ``mita-deit``, ``mita-dwc-deit``,
``mita-dwc-gate-deit``, ``{depict-sa,depict-ca,cbt}-segmenter`` (Segmenter encoder +
decoder) and ``-decoder`` (the decoder alone), ``attention-only`` (refused)). It has
``match(state_dict)``, a predicate on the checkpoint's keys and shapes;
``infer(state_dict, opts, extras)`` -> :class:`Recognised`, the sizes the tensors tell
and the official values of those they cannot; ``convert(state_dict, sizes)`` ->
``(renamed, {unused key: why})`` (:mod:`~mmcbsa.converters.renames`);
``releases(sizes)``, the committed ``configs/`` files to inherit, best first (the release
of these sizes, then the kind's default release); and ``model(sizes)``, the model
settings these sizes fix, which the written config overrides where the release differs.

Not stored in the weights (official value; option to change): MSSA's head width (``U``
is ``H·p × d``; 64; CBSA / TSSA store per-head steps, so their heads are read), DEPICT's
head width (100; the CA width is rows / H), CBSA representatives (classifier 64,
CBT decoder 100), MiTA-DeiT's heads (``d / 64``), ``pool_size`` (5) and ``kv_topk``
(5; or the checkpoint's ``args``; +DWC routes ``pool_size²``), Primal's ``rank_multi``
(read from the sample count below the token count, else 10), a Segmenter encoder's
heads (``d / 64``).
"""
from typing import Dict, Mapping

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


class Kind:
    """One released-checkpoint layout (methods: see the module docstring).

    Attributes:
        name / title: printed, and recorded in the converted checkpoint's ``meta``.
        scope: ``'mmpretrain'`` or ``'mmseg'``: the registry the model is built in.
        options: :class:`ConvertOptions` fields this kind reads; others are refused.
        expected_missing: model key prefixes a checkpoint of this kind does not fill,
            with the reason (the encoder of a decoder-only checkpoint).
    """
    name = title = ''
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


class WhiteBoxClassifier(Kind):
    """CBSA repository classifiers (``models.VisionTransformer``: conv stem +
    ``[attention, ISTA]`` blocks + LN/Linear head; docs/mechanisms.md §1, §2)."""
    _A = 'transformer.layers.0.0.fn.'
    _FAMILY = {'CBSA': 'cbt', 'MSSA': 'crate', 'TSSA': 'tost'}

    def __init__(self, attn: str) -> None:
        self.attn, self.family = attn, self._FAMILY[attn]
        self.name = f'{self.family}-classifier'
        self.title = (f'{self.family.upper() if attn != "TSSA" else "ToST"} classifier: conv '
                      f'stem + [{attn}, ISTA] blocks (docs/mechanisms.md '
                      f'{"§1" if attn == "CBSA" else "§2"})')
        self.options = frozenset({'head_dims', 'num_heads'} |
                                 ({'num_reps'} if attn == 'CBSA' else set()))

    def match(self, sd):
        if 'to_patch_embedding.proj.0.0.weight' not in sd:
            return False
        rep, temp = self._A + 'step_rep' in sd, self._A + 'temp' in sd
        return {'CBSA': rep, 'TSSA': temp and not rep,
                'MSSA': self._A + 'qkv.weight' in sd and not rep and not temp}[self.attn]

    def infer(self, sd, opts, extras):
        a = self._A
        rows_key = a + ('proj.weight' if self.attn == 'CBSA' else 'qkv.weight')
        read_heads = read_from = None
        if self.attn == 'CBSA':
            read_heads, read_from = need(sd, a + 'step_rep').numel(), a + 'step_rep'
            if need(sd, a + 'step_x').numel() != read_heads:
                raise ConversionError(f'{a}step_rep and {a}step_x disagree on the head count '
                                      f'({read_heads} vs {sd[a + "step_x"].numel()})')
        elif self.attn == 'TSSA':
            read_heads, read_from = int(need(sd, a + 'temp').shape[0]), a + 'temp'
        heads, p, why = resolve_heads(int(need(sd, rows_key).shape[0]), rows_key, opts, 64,
                                      read_heads, read_from)
        dim = int(need(sd, 'cls_token').shape[-1])
        patch = 2 ** len(R.stem_indices(sd))
        side = square_grid(int(need(sd, 'pos_embedding').shape[1]), 'pos_embedding', dim)
        rec = Recognised(dict(embed_dims=dim, num_layers=R.layer_count(sd), num_heads=heads,
                              head_dims=p, img_size=side * patch, patch_size=patch,
                              num_classes=int(need(sd, 'mlp_head.1.weight').shape[0])))
        if why:
            rec.defaults['num_heads, head_dims'] = why
        if self.attn == 'CBSA':
            rec.sizes['num_reps'] = chosen(rec, 'num_reps', opts, 64,
                                           'the official 8x8 representatives')
        return rec

    def convert(self, sd, sizes):
        return call_renames(R.convert_white_box_vit, sd, self.attn), {}

    def releases(self, sizes):
        name = SIZE_NAMES.get((sizes['embed_dims'], sizes['num_layers'], sizes['num_heads']))
        return [f'{self.family}/{self.family}-{n}_8xb32-lion-150e_in1k.py'
                for n in (name, 'small') if n]

    def model(self, s):
        attn = dict(head_dims=s['head_dims'])
        if self.attn == 'CBSA':
            attn['num_reps'] = s['num_reps']
        backbone = dict(arch=dict(base=f'{self.family}-small', embed_dims=s['embed_dims'],
                                  num_layers=s['num_layers'], num_heads=s['num_heads'],
                                  attn_cfg=attn),
                        img_size=s['img_size'], patch_size=s['patch_size'])
        if self.attn == 'CBSA':
            backbone['layer_cfgs'] = dict(attn_cfg=dict(legacy_pooling=True))
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
    pos = need(sd, 'pos_embed')
    side = square_grid(int(pos.shape[1]), 'pos_embed', dim)
    hidden = int(need(sd, 'blocks.0.mlp.fc1.weight').shape[0])
    return dict(embed_dims=dim, num_layers=R.layer_count(sd, R.TIMM_BLOCK),
                img_size=side * int(patch.shape[-1]), patch_size=int(patch.shape[-1]),
                mlp_ratio=hidden / dim,
                num_classes=int(sd['head.weight'].shape[0]) if 'head.weight' in sd else None)


def _deit_model(base: str, s: Mapping, attn: dict, **arch) -> dict:
    return dict(backbone=dict(arch=dict(base=base, embed_dims=s['embed_dims'],
                                        num_layers=s['num_layers'], num_heads=s['num_heads'],
                                        mlp_ratio=s['mlp_ratio'], attn_cfg=attn, **arch),
                              img_size=s['img_size'], patch_size=s['patch_size']),
                head=dict(num_classes=s['num_classes'], in_channels=s['embed_dims']))


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

    def match(self, sd):
        if not _is_timm_vit(sd):
            return False
        depth = R.layer_count(sd, R.TIMM_BLOCK)
        primal = [i for i in range(depth) if f'blocks.{i}.attn.we' in sd]
        return bool(primal) and (len(primal) == depth) == self.former

    def infer(self, sd, opts, extras):
        """Heads and ranks from ``attn.we`` ``(H, n, s)``; ``rank_multi`` from
        ``n = min(N, s·rank_multi)`` (``N`` the training token count): ``n / s`` when
        ``n < N``, else the official 10 (docs/mechanisms.md §6.2)."""
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
        rec, multis = Recognised(s), set()
        for i, (_, n, rank) in zip(primal, shapes):
            multi = opts.rank_multi
            if multi is None and n == tokens and rank * 10 >= tokens:
                multi = 10
                rec.defaults['rank_multi'] = (
                    f'10, the official value (attn.we samples all {tokens} tokens, so the '
                    'weights cannot tell; --rank-multi to change)')
            elif multi is None and n < tokens and n % rank == 0:
                multi = n // rank
            elif multi is None or n != min(tokens, rank * multi):
                hint = f' (the tensors say --rank-multi {n // rank})' \
                    if n % rank == 0 and n < tokens else ''
                raise ConversionError(
                    f'--rank-multi {multi} gives n = min({tokens}, {rank}*{multi}) = '
                    f'{min(tokens, rank * multi)} sampled positions, but blocks.{i}.attn.we '
                    f'has n = {n}{hint}' if multi else f'blocks.{i}.attn.we samples n = {n} '
                    f'of N = {tokens} tokens with rank s = {rank}: give --rank-multi R with '
                    f'n = min(N, s*R)')
            multis.add(multi)
        if len(multis) != 1:
            raise ConversionError(f'Primal blocks {primal} imply different rank_multi values '
                                  f'{sorted(multis)}')
        if opts.rank_multi is not None:
            rec.defaults['rank_multi'] = (f'{opts.rank_multi}, given (--rank-multi; checked '
                                          'against the sample count of attn.we)')
        ranks = [rank for _, _, rank in shapes]
        if not self.former and len(set(ranks)) != 1:
            raise ConversionError(f'Primal blocks {primal} have different low ranks {ranks}; '
                                  'only PrimalFormer gives one per block')
        rec.sizes.update(num_heads=heads, rank_multi=multis.pop(),
                         low_rank=ranks if self.former else ranks[0],
                         num_tail_layers=len(primal),
                         qkv_bias='blocks.0.attn.qkv.bias' in sd,
                         qk_bias=f'blocks.{primal[0]}.attn.qk.bias' in sd)
        return rec

    def convert(self, sd, sizes):
        return call_renames(R.convert_timm_vit, sd, R.convert_primal_block_attention, '',
                            DEIT_HEAD), {}

    def releases(self, sizes):
        return ['primal/primalformer-small_4xb256_in1k.py' if self.former
                else 'primal/primal-deit-small_4xb256_in1k.py']

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
        rec.defaults['num_heads'] = why if opts.num_heads or opts.head_dims else (
            f"{heads}, for DeiT's head width 64 (qkv is 3d x d, no per-head tensor; "
            '--num-heads / --head-dims to change)')
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

    def releases(self, sizes):
        name = SIZE_NAMES.get((sizes['embed_dims'], sizes['num_layers'], sizes['num_heads']))
        variant = 'mita-dwc-gate-deit' if self.gate else 'mita-dwc-deit' if self.dwc else \
            'mita-deit'
        return [f'mita/{variant}-{n}_4xb256_in1k.py' for n in (name, 'small') if n]

    def model(self, s):
        attn = dict(num_landmarks=s['num_landmarks'], topk=s['topk'], qkv_bias=s['qkv_bias'],
                    proj_bias=s['proj_bias'], dwc=self.dwc, gate=self.gate)
        model = _deit_model('mita-deit-small-dwc-gate' if self.gate else 'mita-deit-small',
                            s, attn)
        model['backbone']['layer_cfgs'] = dict(attn_cfg=dict(legacy_pooling=True))
        return model


_SEG_HEAD_KEYS = {'depict-sa': 'net.layers.0.fn.proj', 'depict-ca': 'snet.layers.0.fn.proj',
                  'cbt': 'net.layers.0.fn.proj.weight'}


class SegmenterKind(Kind):
    """Segmenter-style checkpoints (DEPICT repository; CBSA repository
    ``CBSA_semantic_segmentation``): ``encoder.*`` (Segmenter's timm ViT) and
    ``decoder.*`` (DEPICT-SA / -CA / CBT decoder, docs/mechanisms.md §3, §4), or the
    decoder alone -> mmseg ``EncoderDecoder`` (mmseg ``VisionTransformer`` through
    mmseg's ``vit2mmseg``, ``DEPICTHead`` / ``CBTHead``). Segmenter's encoder differs
    from mmseg's Segmenter configs in three settings the written config sets: LayerNorm
    eps 1e-5, a biased patch convolution, bilinear position-embedding resizing."""
    scope = 'mmseg'

    def __init__(self, head: str, full: bool) -> None:
        self.head, self.full = head, full
        self.name = f"{head}-{'segmenter' if full else 'decoder'}"
        label = {'depict-sa': 'DEPICT-SA', 'depict-ca': 'DEPICT-CA', 'cbt': 'CBT'}[head]
        section = '§4' if head == 'cbt' else '§3'
        self.title = (f'Segmenter ViT encoder + {label} decoder (docs/mechanisms.md {section})'
                      if full else f'{label} decoder alone (docs/mechanisms.md {section})')
        opts = {'num_heads', 'head_dims'} | ({'num_reps'} if head == 'cbt' else set())
        self.options = frozenset(opts | ({'encoder_num_heads'} if full else set()))
        self.expected_missing = {} if full else {
            'backbone.': 'the encoder is not in this checkpoint (decoder only)'}

    @staticmethod
    def _prefix(sd) -> str:
        return 'decoder.' if any(k.startswith('decoder.') for k in sd) else ''

    def match(self, sd):
        if any(k.startswith('encoder.') for k in sd) != self.full:
            return False
        prefix = self._prefix(sd)
        return bool(prefix or not self.full) and prefix + _SEG_HEAD_KEYS[self.head] in sd

    def _decoder(self, sd, prefix, opts, rec: Recognised) -> dict:
        cls_emb = need(sd, prefix + 'cls_emb')
        n_cls, d = int(cls_emb.shape[1]), int(cls_emb.shape[2])
        if self.head == 'cbt':
            rows_key = f'{prefix}net.layers.0.fn.proj.weight'
            heads, p, _ = resolve_heads(int(need(sd, rows_key).shape[0]), rows_key, opts, 100,
                                        need(sd, f'{prefix}net.layers.0.fn.step_x').numel(),
                                        f'{prefix}net.layers.0.fn.step_x')
            layers = R.layer_count({k[len(prefix):]: v for k, v in sd.items()
                                    if k.startswith(prefix)}, R.CBT_LAYER)
            reps = chosen(rec, 'num_reps', opts, 100, 'the official 10x10 representatives')
            return dict(num_classes=n_cls, in_channels=d, channels=d, num_layers=layers,
                        num_heads=heads, head_dims=p, num_reps=reps)
        stack = 'net' if self.head == 'depict-sa' else 'snet'
        rows_key = f'{prefix}{stack}.layers.0.fn.proj'
        heads, p, why = resolve_heads(int(need(sd, rows_key).shape[0]), rows_key, opts, 100)
        if why:
            rec.defaults['num_heads, head_dims'] = why.replace(
                'the official head width', "the reference's hard-coded head width")
        head = dict(num_classes=n_cls, in_channels=d, channels=d, mode=self.head[-2:],
                    num_layers=R.depict_layer_count(sd, prefix, stack), num_heads=heads,
                    head_dims=p)
        if self.head == 'depict-ca':
            ca_key = f'{prefix}cnet.layers.0.fn.proj'
            ca_rows = int(need(sd, ca_key).shape[0])
            if ca_rows % heads:
                raise ConversionError(f'{ca_key} has {ca_rows} rows, not a multiple of the '
                                      f'{heads} heads of {rows_key}')
            head.update(ca_num_layers=R.depict_layer_count(sd, prefix, 'cnet'),
                        ca_num_heads=heads, ca_head_dims=ca_rows // heads)
        return head

    def _encoder(self, sd, opts, rec: Recognised, width: int) -> dict:
        s = call_renames(_timm_sizes, {k[len('encoder.'):]: v for k, v in sd.items()
                                       if k.startswith('encoder.')})
        dim = s['embed_dims']
        if dim != width:
            raise ConversionError(f'the encoder is {dim} wide (encoder.cls_token) but the '
                                  f'decoder reads {width}-wide tokens (decoder.cls_emb)')
        heads, _, why = resolve_heads(dim, f'the encoder width (encoder.cls_token, {dim})',
                                      opts, 64, heads_flag='encoder_num_heads', dims_flag=None)
        if why:
            rec.defaults['encoder num_heads'] = why if opts.encoder_num_heads else (
                f"{heads}, for Segmenter ViT's head width 64 (qkv is 3d x d, no per-head "
                'tensor; --encoder-num-heads to change)')
        if s['mlp_ratio'] != int(s['mlp_ratio']):
            raise ConversionError(f"the encoder MLP is {int(s['mlp_ratio'] * dim)} wide, not a "
                                  f"multiple of its width {dim}: mmseg's VisionTransformer "
                                  'cannot express it')
        return dict(img_size=(s['img_size'], s['img_size']), patch_size=s['patch_size'],
                    embed_dims=dim, num_layers=s['num_layers'], num_heads=heads,
                    mlp_ratio=int(s['mlp_ratio']))

    def infer(self, sd, opts, extras):
        prefix = self._prefix(sd)
        rec = Recognised({})
        rec.sizes['decode_head'] = self._decoder(sd, prefix, opts, rec)
        if self.full:
            rec.sizes['backbone'] = self._encoder(sd, opts, rec,
                                                  rec.sizes['decode_head']['in_channels'])
        else:
            rec.notes.append(
                "the checkpoint holds no encoder: the config's encoder (the release's, of "
                "the decoder's width) is not the one this decoder was trained on; set that "
                'encoder and its weights before testing')
        return rec

    def convert(self, sd, sizes):
        fn = R.convert_cbt_decoder if self.head == 'cbt' else R.convert_depict
        unused = {k: "Segmenter encoder's classification head (mmseg's ViT has none)"
                  for k in sd if k.startswith('encoder.')
                  and k[len('encoder.'):].startswith(R.ENCODER_DROPPED)}
        if self._prefix(sd):
            return call_renames(R.convert_segmenter, sd, fn), unused
        return call_renames(fn, sd, '', 'decode_head.'), unused

    def releases(self, sizes):
        if self.full:
            enc = sizes['backbone']
            size = SIZE_NAMES.get((enc['embed_dims'], enc['num_layers'], enc['num_heads']))
        else:
            d = sizes['decode_head']['in_channels']
            size = next((n for (dim, _, _), n in SIZE_NAMES.items() if dim == d), None)
        folder, head = ('cbt', 'cbt-head') if self.head == 'cbt' else ('depict', self.head)
        crop = {'large': '640x640'}
        return [f'{folder}/{head}_vit-{n[0]}_mask_8xb1-160k_ade20k-{crop.get(n, "512x512")}.py'
                for n in (size, 'small') if n]

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


_ATTENTION_MODULES = (
    ('a CBSA attention module', "convert_attention('cbsa', ...)",
     lambda keys: keys == {'proj.weight', 'step_rep', 'step_x', 'to_out.weight', 'to_out.bias'}),
    ('an MSSA attention module', "convert_attention('mssa', ...)",
     lambda keys: keys == {'qkv.weight', 'to_out.weight', 'to_out.bias'}),
    ('a TSSA attention module', "convert_attention('tssa', ...)",
     lambda keys: keys == {'qkv.weight', 'temp', 'to_out.weight', 'to_out.bias'}),
    ("a softmax-layout attention module (qkv, proj: ViT, MiTA or the CBSA repository's "
     'ViT-adaptation attention)', 'convert_mita_attention for MiTA; the others keep their names',
     lambda keys: {'qkv.weight', 'proj.weight'} <= keys <= {
         'qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias', 'dwc.weight', 'dwc.bias'}),
)


class AttentionOnly(Kind):
    """One attention module (the reference fixtures ``*_attention``): refused."""
    name = 'attention-only'
    title = 'a single attention module (not a model checkpoint)'

    def _which(self, sd):
        return next(((what, fn) for what, fn, test in _ATTENTION_MODULES if test(set(sd))), None)

    def match(self, sd):
        return self._which(sd) is not None

    def infer(self, sd, opts, extras):
        what, fn = self._which(sd)
        raise ConversionError(f'holds {what} ({len(sd)} tensors: {", ".join(sorted(sd))}), '
                              'not a released model checkpoint; attention modules are '
                              f'converted in Python (mmcbsa.converters: {fn})')


KINDS: Dict[str, Kind] = {k.name: k for k in (
    WhiteBoxClassifier('CBSA'), WhiteBoxClassifier('MSSA'), WhiteBoxClassifier('TSSA'),
    PrimalClassifier(former=False), PrimalClassifier(former=True),
    MiTADeiT(dwc=False), MiTADeiT(dwc=True), MiTADeiT(dwc=True, gate=True),
    *(SegmenterKind(h, full) for full in (True, False) for h in ('depict-sa', 'depict-ca', 'cbt')),
    AttentionOnly())}


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
    :class:`ConversionError` saying what was seen)."""
    found = [kind for kind in KINDS.values() if kind.match(state_dict)]
    if len(found) > 1:
        raise ConversionError(f'ambiguous checkpoint: it matches the kinds '
                              f'{[k.name for k in found]} ({_summary(state_dict)})')
    if not found:
        hint = ''
        if any(k.startswith(('backbone.', 'decode_head.')) for k in state_dict):
            hint = ' -- it looks like an mmcbsa / OpenMMLab checkpoint already: use it ' \
                   'with its config directly'
        raise ConversionError(f'unknown kind of checkpoint: {_summary(state_dict)}{hint}; '
                              f'known kinds: {", ".join(KINDS)}')
    return found[0]
