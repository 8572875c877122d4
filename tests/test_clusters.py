import numpy as np

from embeddings.clusters import ClusterModel, clusters_for


def _blobs(rng, centres: np.ndarray, per: int) -> np.ndarray:
    return np.concatenate([c + 0.05 * rng.normal(size=(per, centres.shape[1])) for c in centres]).astype(np.float32)


def test_refit_keeps_each_clusters_id_and_numbers_new_clusters_after_the_old():
    """M3CSR's cluster IDs are trained embeddings: when the catalogue grows and k-means runs again,
    an item of an old cluster must keep that cluster's id, and new clusters take new ids."""
    rng = np.random.default_rng(0)
    centres = np.eye(6, 8) * 10  # well apart: k-means finds each blob
    first = _blobs(rng, centres[:3], 40)
    old = ClusterModel.fit(first, 3)
    grown = np.concatenate([first, _blobs(rng, centres, 40)])
    new = old.refit(grown, 6)
    assert len(new.centroids) == 6
    assert (new.assign(first) == old.assign(first)).all()
    newcomers = _blobs(rng, centres[3:], 10)
    assert set(new.assign(newcomers).tolist()) == {3, 4, 5}


def test_k_follows_the_catalogue_within_the_tables_rows():
    assert clusters_for(1, 1024) == 2 and clusters_for(1600, 1024) == 40 and clusters_for(10**8, 1024) == 1024
