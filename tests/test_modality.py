"""Modality and patch maps: shapes, inferred grids, and the errors that name a mismatch."""

import pytest
import torch

from modalkv.modality import IMAGE, TEXT, VIDEO, check_patches, infer_patches, patches_from_grids, squarest_grid


def test_patches_from_grids_places_images_row_major_in_order():
    modality = torch.tensor([[TEXT, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, TEXT, IMAGE, IMAGE]])
    patches = patches_from_grids(modality, [[(2, 3), (1, 2)]])
    assert patches[0, 0].tolist() == [-1, -1, -1] and patches[0, 7].tolist() == [-1, -1, -1]
    assert patches[0, 1:7].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert patches[0, 8:].tolist() == [[1, 0, 0], [1, 0, 1]]
    assert check_patches(patches, modality) is not None


def test_patches_from_grids_refuses_grids_that_miss_tokens():
    modality = torch.tensor([[TEXT, IMAGE, IMAGE, IMAGE]])
    with pytest.raises(ValueError, match="3 visual tokens but its image grids"):
        patches_from_grids(modality, [[(2, 2)]])


def test_infer_patches_splits_runs_into_squarest_grids():
    modality = torch.tensor([[IMAGE] * 4 + [TEXT] + [VIDEO] * 6, [TEXT] * 2 + [IMAGE] * 9])
    patches = infer_patches(modality)
    assert patches[0, :4, 1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert patches[0, 5:, 0].unique().tolist() == [1] and patches[0, 10].tolist() == [1, 1, 2]
    assert patches[1, 2:, 0].unique().tolist() == [0] and patches[1, -1].tolist() == [0, 2, 2]
    assert squarest_grid(7) == (1, 7) and squarest_grid(576) == (24, 24)


def test_check_patches_names_shape_and_placement_errors():
    modality = torch.tensor([[TEXT, IMAGE]])
    with pytest.raises(ValueError, match="patch map has shape"):
        check_patches(torch.zeros(1, 3, 3, dtype=torch.long), modality)
    with pytest.raises(ValueError, match="exactly the image/video tokens"):
        check_patches(torch.zeros(1, 2, 3, dtype=torch.long), modality)
