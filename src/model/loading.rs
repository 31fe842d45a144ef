//! Model folders and hub ids: config, weights, tokenizer, voices; dtype and device.
