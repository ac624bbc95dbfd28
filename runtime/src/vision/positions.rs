//! Position bookkeeping shared by the tower and the text model.
//!
//! - [`merge_order`]: the order in which a grid's patches are stored, each `merge × merge`
//!   group as consecutive rows (the order the preprocessor writes and the merger expects).
//! - [`mrope_position_ids`]: the (t, h, w) MRoPE positions of a prompt. Text advances all three
//!   together; an image holds t at its start and walks h, w over its merged grid; the text
//!   after it resumes at the largest position used so far + 1.

/// Why image grids and `<|image_pad|>` runs in a prompt disagree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PositionError {
    #[error("prompt has more image placeholder runs than images ({images})")]
    MoreRunsThanImages { images: usize },
    #[error("image {index} needs {expected} placeholder tokens but the prompt has {found}")]
    RunLength {
        index: usize,
        expected: usize,
        found: usize,
    },
    #[error("{unused} image(s) have no placeholder run in the prompt")]
    UnusedImages { unused: usize },
    #[error("image {index}: grid {grid:?} is not divisible by the spatial merge size {merge}")]
    Grid {
        index: usize,
        grid: [u32; 3],
        merge: usize,
    },
}

/// `(row, col)` of every patch of an `h × w` grid in storage order: merge groups row-major,
/// and inside a group its `merge × merge` patches row-major.
pub fn merge_order(h: usize, w: usize, merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(h * w);
    for bh in 0..h / merge {
        for bw in 0..w / merge {
            for ih in 0..merge {
                for iw in 0..merge {
                    out.push((bh * merge + ih, bw * merge + iw));
                }
            }
        }
    }
    out
}

/// Number of `<|image_pad|>` tokens (merged patches) of an image with `grid` = (t, h, w).
pub fn merged_token_count(grid: [u32; 3], merge: usize) -> usize {
    let [t, h, w] = grid.map(|x| x as usize);
    t * (h / merge) * (w / merge)
}

/// MRoPE positions `(t, h, w)` for every token of `input_ids`, and the position of the next
/// token after the prompt. The k-th run of `image_token_id` belongs to `image_grids[k]`
/// (patch grids as the preprocessor reports them, before merging).
pub fn mrope_position_ids(
    input_ids: &[u32],
    image_grids: &[[u32; 3]],
    image_token_id: u32,
    spatial_merge: usize,
) -> Result<(Vec<[i32; 3]>, i32), PositionError> {
    let mut positions = Vec::with_capacity(input_ids.len());
    let mut next: i32 = 0;
    let mut images = image_grids.iter().enumerate();
    let mut i = 0;
    while i < input_ids.len() {
        if input_ids[i] != image_token_id {
            positions.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let (index, &grid) = images.next().ok_or(PositionError::MoreRunsThanImages {
            images: image_grids.len(),
        })?;
        let [t, h, w] = grid.map(|x| x as usize);
        if spatial_merge == 0
            || !h.is_multiple_of(spatial_merge)
            || !w.is_multiple_of(spatial_merge)
        {
            return Err(PositionError::Grid {
                index,
                grid,
                merge: spatial_merge,
            });
        }
        let (mh, mw) = (h / spatial_merge, w / spatial_merge);
        let expected = t * mh * mw;
        let found = input_ids[i..]
            .iter()
            .take(expected)
            .take_while(|&&id| id == image_token_id)
            .count();
        if found != expected {
            return Err(PositionError::RunLength {
                index,
                expected,
                found,
            });
        }
        for tt in 0..t {
            for hh in 0..mh {
                for ww in 0..mw {
                    positions.push([next + tt as i32, next + hh as i32, next + ww as i32]);
                }
            }
        }
        let extent = t.max(mh).max(mw) as i32;
        next += extent;
        i += expected;
    }
    let unused = images.count();
    if unused > 0 {
        return Err(PositionError::UnusedImages { unused });
    }
    Ok((positions, next))
}

/// Offset between a token's sequence index and its (text) MRoPE position after an image
/// prompt: the decode step at index `i ≥ prompt_len` uses position `i + rope_delta` on all
/// three axes.
pub fn rope_delta(next_position: i32, prompt_len: usize) -> i32 {
    next_position - prompt_len as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 9;

    #[test]
    fn text_only_positions_are_the_indices() {
        let (pos, next) = mrope_position_ids(&[1, 2, 3], &[], IMG, 2).unwrap();
        assert_eq!(pos, vec![[0; 3], [1; 3], [2; 3]]);
        assert_eq!(next, 3);
        assert_eq!(rope_delta(next, 3), 0);
    }

    #[test]
    fn an_image_walks_its_merged_grid_and_text_resumes_after_the_maximum() {
        // 4×6 patches, merge 2 → 2×3 merged tokens.
        let ids = [1, 2, IMG, IMG, IMG, IMG, IMG, IMG, 3];
        let (pos, next) = mrope_position_ids(&ids, &[[1, 4, 6]], IMG, 2).unwrap();
        assert_eq!(&pos[..2], &[[0; 3], [1; 3]]);
        let image: Vec<[i32; 3]> = vec![
            [2, 2, 2],
            [2, 2, 3],
            [2, 2, 4],
            [2, 3, 2],
            [2, 3, 3],
            [2, 3, 4],
        ];
        assert_eq!(&pos[2..8], image.as_slice());
        assert_eq!(pos[8], [5; 3]);
        assert_eq!(next, 6);
        assert_eq!(rope_delta(next, ids.len()), -3);
    }

    #[test]
    fn mismatched_runs_are_errors() {
        assert_eq!(
            mrope_position_ids(&[IMG, IMG, IMG], &[[1, 4, 4]], IMG, 2),
            Err(PositionError::RunLength {
                index: 0,
                expected: 4,
                found: 3
            })
        );
        assert_eq!(
            mrope_position_ids(&[IMG], &[], IMG, 2),
            Err(PositionError::MoreRunsThanImages { images: 0 })
        );
        assert_eq!(
            mrope_position_ids(&[1], &[[1, 2, 2]], IMG, 2),
            Err(PositionError::UnusedImages { unused: 1 })
        );
        assert!(matches!(
            mrope_position_ids(&[IMG], &[[1, 3, 2]], IMG, 2),
            Err(PositionError::Grid { .. })
        ));
    }

    #[test]
    fn merge_order_keeps_groups_consecutive() {
        assert_eq!(
            merge_order(2, 4, 2),
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }
}
