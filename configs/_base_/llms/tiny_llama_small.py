# tiny_llama at half width and half depth (1 layer, hidden 64) for CPU sweeps.
llm = dict(
    type='HFCausalLM',
    config=dict(model_type='llama', hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, intermediate_size=176, vocab_size=256, rope_theta=10000.0,
                max_position_embeddings=512, tie_word_embeddings=False),
    attn_implementation='eager',
)
tokenizer = dict(pretrained='data/synthetic/tokenizer')
template = 'vicuna_v1'
