"""LangChain integration of kvpacket-rag: answer from precomputed KV packets of retrieved documents."""

from langchain_kvpacket.chat_models import PACKET_KEY, ChatKVPacket, split_conversation
from langchain_kvpacket.rag import (KVPacketDocumentTransformer, KVPacketEmbeddings, KVPacketRetriever,
                                    PacketIndexRetriever, create_kvpacket_rag_chain)

__all__ = ["PACKET_KEY", "ChatKVPacket", "KVPacketDocumentTransformer", "KVPacketEmbeddings", "KVPacketRetriever",
           "PacketIndexRetriever", "create_kvpacket_rag_chain", "split_conversation"]
