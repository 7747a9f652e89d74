# DEPICT-CA: the SA config's patch stream (L = 3, H = 3, p = 100) and 3
# cross-attention layers of width p = 50 from the class embeddings to the patches
# (docs/mechanisms.md §3).
_base_ = ['./depict-sa_vit-t_mask_8xb1-160k_ade20k-512x512.py']

model = dict(
    decode_head=dict(mode='ca', ca_num_layers=3, ca_num_heads=3, ca_head_dims=50))
