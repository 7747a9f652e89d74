"""The reference implementations' constructor arguments (the fixtures' ``config``) as
mmcbsa settings: the tests' own statement of how the papers' modules map onto ours
(docs/mechanisms.md). The converter reads the same sizes off the tensors
(``mmcbsa.converters.kinds``); ``tests/test_official2mmcbsa.py`` checks that path."""


def white_box_attention(kind: str, cfg: dict) -> dict:
    """CBSA / MSSA / TSSA (``dim``, ``heads``, ``dim_head``[, ``num_reps``]); CBSA pools
    its representatives the reference's way."""
    out = dict(type=kind.upper(), embed_dims=cfg['dim'], num_heads=cfg['heads'],
               head_dims=cfg['dim_head'])
    if kind.lower() == 'cbsa':
        out.update(num_reps=cfg.get('num_reps', 64), legacy_pooling=True)
    return out


def white_box_classifier(cfg: dict) -> dict:
    """``vit_{cbsa,mssa,tssa}_ista_classifier`` -> ImageClassifier(WhiteBoxViT)."""
    attn = white_box_attention(cfg['attn'], cfg)
    for key in ('embed_dims', 'num_heads'):
        attn.pop(key)
    return dict(
        type='ImageClassifier',
        backbone=dict(type='WhiteBoxViT', arch=dict(
            embed_dims=cfg['dim'], num_layers=cfg['depth'], num_heads=cfg['heads'],
            stem='conv', layout='ista', norm_eps=1e-5, attn_cfg=attn,
            ffn_cfg=dict(type='ISTA')), img_size=cfg['image_size'],
            patch_size=cfg['patch_size'], out_type='cls_token'),
        head=dict(type='LinearClsHead', num_classes=cfg['num_classes'], in_channels=cfg['dim'],
                  loss=dict(type='CrossEntropyLoss')))


def primal_attention(cfg: dict, layer: int = 0) -> dict:
    """``PrimalAttention`` kwargs; ``low_rank`` may be a list (one rank per block)."""
    rank = cfg['low_rank']
    rank = rank[layer] if isinstance(rank, (list, tuple)) else rank
    return dict(embed_dims=cfg['embed_dim'], num_heads=cfg['num_heads'], low_rank=rank,
                rank_multi=cfg.get('rank_multi', 10),
                num_tokens_train=(cfg['img_size'] // cfg['patch_size']) ** 2 + 1,
                qk_bias=cfg.get('qk_bias', cfg.get('qkv_bias', True)))


def primal_classifier(cfg: dict) -> dict:
    """PrimalFormer (every block Primal, one rank per block) / Primal.+DeiT (the last
    ``num_ksvd_layer`` blocks) -> KSVDImageClassifier(WhiteBoxViT)."""
    depth = cfg['depth']
    n_primal = depth if isinstance(cfg['low_rank'], list) else cfg['num_ksvd_layer']
    layer_cfgs = []
    for i in range(depth):
        attn = dict(type='MHSA', qkv_bias=cfg.get('qkv_bias', True))
        if i >= depth - n_primal:
            attn = dict(type='PrimalAttention', **primal_attention(cfg, i))
        layer_cfgs.append(dict(attn_cfg=attn))  # another type replaces the arch's
    return dict(
        type='KSVDImageClassifier', ksvd_weight=0.05,
        backbone=dict(type='WhiteBoxViT', arch=dict(
            base='deit-small', embed_dims=cfg['embed_dim'], num_layers=depth,
            num_heads=cfg['num_heads'], mlp_ratio=cfg.get('mlp_ratio', 4)),
            layer_cfgs=layer_cfgs,
            img_size=cfg['img_size'], patch_size=cfg['patch_size'], out_type='cls_token'),
        head=dict(type='LinearClsHead', num_classes=cfg['num_classes'],
                  in_channels=cfg['embed_dim'], loss=dict(type='CrossEntropyLoss')))


def mita_attention(cfg: dict, dwc: bool = False, gate: bool = False,
                   routed: bool = False) -> dict:
    """``MiTA`` kwargs: the reference squares its arguments (``pool_size=P``: ``P²``
    landmarks; ``kv_topk=K``: ``K²`` routed keys); the DWC and gate modules route
    ``P²`` keys, the routed-only module ``2P²`` and has no agent expert."""
    pool = cfg.get('pool_size', 5)
    dwc = dwc or gate
    topk = cfg['kv_topk'] ** 2 if 'kv_topk' in cfg else (pool * pool if dwc or routed else 25)
    return dict(embed_dims=cfg['dim'], num_heads=cfg['num_heads'], num_landmarks=(pool, pool),
                topk=topk * 2 if routed else topk, qkv_bias=cfg.get('qkv_bias', False),
                proj_bias=cfg.get('proj_bias', True), dwc=dwc, gate=gate,
                mode='routed' if routed else 'mixture', legacy_pooling=True)


def depict_head(cfg: dict) -> dict:
    """Official ``MaskTransformer`` (``n_cls, d_model, n_layers, n_heads[, dim_head,
    ca_layers, ca_dim_head, mode]``; hard-coded widths 100 and 50) -> DEPICTHead."""
    d = cfg['d_model']
    out = dict(type='DEPICTHead', in_channels=d, channels=d, num_classes=cfg['n_cls'],
               mode=cfg.get('mode', 'sa'), num_layers=cfg['n_layers'],
               num_heads=cfg['n_heads'], head_dims=cfg.get('dim_head', 100))
    if out['mode'] == 'ca':
        out.update(ca_num_layers=cfg.get('ca_layers', 3), ca_num_heads=cfg['n_heads'],
                   ca_head_dims=cfg.get('ca_dim_head', 50))
    return out


def cbt_head(cfg: dict) -> dict:
    """Official CBT decoder (``n_cls, d_model, n_layers, n_heads[, dim_head, num_reps]``;
    hard-coded 100 and 100) -> CBTHead."""
    d = cfg['d_model']
    return dict(type='CBTHead', in_channels=d, channels=d, num_classes=cfg['n_cls'],
                num_layers=cfg['n_layers'], num_heads=cfg['n_heads'],
                head_dims=cfg.get('dim_head', 100), num_reps=cfg.get('num_reps', 100))
