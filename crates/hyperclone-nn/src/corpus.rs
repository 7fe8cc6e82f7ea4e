//! placeholder: corpus loading, BPE training and batching (being written)
