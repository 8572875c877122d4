"""The ID tables' managed collisions, without a process group: what TorchRec's MCH module keeps."""
import torch
from torchrec.modules.mc_modules import DistanceLFU_EvictionPolicy
from torchrec.sparse.jagged_tensor import JaggedTensor

from embeddings.tables import CountingMCH


def _held(m: CountingMCH) -> set[int]:
    ids = m._mch_sorted_raw_ids[:-1]
    return set(ids[ids < torch.iinfo(torch.int64).max].tolist())


def test_a_batch_larger_than_the_first_keeps_every_new_id():
    """TorchRec sizes its buffer of new ids from the first batch and truncates later ones to it; the
    workers' first batches have no histories and later ones many history items, so ids were lost."""
    m = CountingMCH(zch_size=1000, device=torch.device("cpu"), eviction_policy=DistanceLFU_EvictionPolicy(),
                    eviction_interval=2, input_hash_size=2**62, buckets=1, name="t")
    m.train()
    shown: set[int] = set()
    for ids in (range(10), range(100, 600), range(600, 700), range(1000, 1300)):  # 910 ids, 999 free rows
        shown |= set(ids)
        values = torch.tensor(list(ids), dtype=torch.int64)
        m.profile({"f": JaggedTensor(values=values, lengths=torch.ones(len(values), dtype=torch.int32))})
    assert _held(m) == shown
