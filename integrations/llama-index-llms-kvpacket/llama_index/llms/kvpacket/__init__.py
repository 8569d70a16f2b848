"""LlamaIndex integration of kvpacket-rag: answer from precomputed KV packets of retrieved nodes."""

from llama_index.llms.kvpacket.base import PACKET_KEY, KVPacketLLM, split_chat
from llama_index.llms.kvpacket.components import (KVPacketChatEngine, KVPacketEmbedding, KVPacketNodePostprocessor,
                                                  KVPacketSynthesizer, KVPacketTransform, as_kvpacket_query_engine)

__all__ = ["PACKET_KEY", "KVPacketChatEngine", "KVPacketEmbedding", "KVPacketLLM", "KVPacketNodePostprocessor",
           "KVPacketSynthesizer", "KVPacketTransform", "as_kvpacket_query_engine", "split_chat"]
