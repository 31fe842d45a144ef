//! Tokenizer and chat template, exactly as the published processor formats a conversation.
