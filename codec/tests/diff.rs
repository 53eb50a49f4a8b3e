//! Child headers (e2b `ToDiffHeader`): a worked example, error cases, and a model check over
//! several generations.

#[cfg(test)]
// One-element `vec![a..b]` is a list of one block range here, not a mistaken range of values.
#[allow(clippy::single_range_in_vec_init, clippy::reversed_empty_ranges)]
mod tests {

    use std::collections::HashMap;
    use std::ops::Range;

    use proptest::prelude::*;
    use thaw_codec::diff::{DiffMetadata, child_header};
    use thaw_codec::{
        BuildData, BuildId, CompressionType, ErrorKind, Frame, FrameTable, Header, Mapping,
        NIL_BUILD, PAGE_SIZE,
    };

    const P: u64 = PAGE_SIZE;

    fn id(n: u8) -> BuildId {
        BuildId::from_bytes([n; 16])
    }

    fn m(offset: u64, length: u64, build: BuildId, storage: u64) -> Mapping {
        Mapping {
            offset,
            length,
            build_id: build,
            build_storage_offset: storage,
        }
    }

    /// One frame per `frame_pages` pages of a `pages`-page data file.
    fn table(pages: u64, frame_pages: u64) -> FrameTable {
        let frames = (0..pages.div_ceil(frame_pages))
            .map(|i| Frame {
                start_u: i * frame_pages * P,
                start_c: i * 1000,
                size_u: u32::try_from(frame_pages * P).unwrap(),
                size_c: 1000,
            })
            .collect();
        FrameTable::new(CompressionType::Zstd, frames).unwrap()
    }

    /// Parent (V4, 16 pages): A [0,8) -> 0, nil [8,12), B [12,16) -> 4. A has a zstd table of
    /// 2-page frames; B has a zero entry.
    fn parent() -> Header {
        let mut h = Header::new_base(id(0xA), 16 * P, 4096, 4).unwrap();
        h.metadata.generation = 4;
        h.metadata.base_build_id = id(0xBA);
        h.mappings = vec![
            m(0, 8 * P, id(0xA), 0),
            m(8 * P, 4 * P, NIL_BUILD, 0),
            m(12 * P, 4 * P, id(0xB), 4 * P),
        ];
        h.builds.insert(
            id(0xA),
            BuildData {
                size: 8 * P,
                checksum: [7; 32],
                frames: table(8, 2),
            },
        );
        h.builds.insert(id(0xB), BuildData::default());
        h.validate().unwrap();
        h
    }

    #[test]
    fn worked_example_matches_e2b_merge_semantics() {
        let new = id(0xC);
        let diff = DiffMetadata {
            block_size: 4096,
            // [2,4) and [4,5) are adjacent runs of the same build: they join.
            dirty: vec![2..4, 4..5, 10..11, 13..14],
            // [3,4) is also dirty: dirty wins. [7,8) joins the parent's nil [8,10).
            empty: vec![3..4, 5..6, 7..8],
        };
        assert_eq!(diff.dirty_blocks(), 5);
        let child = child_header(&parent(), new, &diff).unwrap();

        assert_eq!(
            child.mappings,
            vec![
                m(0, 2 * P, id(0xA), 0),
                m(2 * P, 3 * P, new, 0), // packed: blocks 2,3,4 at 0..3 pages
                m(5 * P, P, NIL_BUILD, 0),
                m(6 * P, P, id(0xA), 6 * P), // the parent's A shifted by the split
                m(7 * P, 3 * P, NIL_BUILD, 0),
                m(10 * P, P, new, 3 * P),
                m(11 * P, P, NIL_BUILD, 0),
                m(12 * P, P, id(0xB), 4 * P),
                m(13 * P, P, new, 4 * P),
                m(14 * P, 2 * P, id(0xB), 6 * P),
            ]
        );
        let md = child.metadata;
        assert_eq!(md.build_id, new);
        assert_eq!(md.base_build_id, id(0xBA));
        assert_eq!(md.generation, 5);
        assert_eq!((md.version, md.block_size, md.size), (4, 4096, 16 * P));
        assert!(!child.incomplete);

        // Builds: A trimmed to the frames its remaining ranges ([0,2) and [6,7) pages) touch; B's
        // zero entry carried; no entry for the new build (the caller adds it after compressing).
        assert_eq!(child.builds.len(), 2);
        let a = &child.builds[&id(0xA)];
        let starts: Vec<u64> = a.frames.frames().iter().map(|f| f.start_u).collect();
        assert_eq!(starts, vec![0, 6 * P]);
        assert_eq!((a.size, a.checksum), (8 * P, [7; 32]));
        assert!(child.builds[&id(0xB)].is_zero());
        assert!(!child.builds.contains_key(&new));

        // The child serializes and reads back.
        assert_eq!(Header::parse(&child.to_bytes().unwrap()).unwrap(), child);
    }

    #[test]
    fn builds_no_longer_referenced_are_dropped() {
        let diff = DiffMetadata {
            block_size: 4096,
            dirty: vec![12..16],
            empty: vec![],
        };
        let child = child_header(&parent(), id(0xC), &diff).unwrap();
        assert!(child.builds.contains_key(&id(0xA)));
        assert!(!child.builds.contains_key(&id(0xB)));
    }

    #[test]
    fn same_build_runs_merge_only_when_storage_contiguous() {
        let mut h = Header::new_base(id(0xA), 8 * P, 4096, 3).unwrap();
        h.mappings = vec![
            m(0, 2 * P, id(0xA), 0),
            m(2 * P, 2 * P, id(0xA), 10 * P), // same build, not contiguous in storage
            m(4 * P, 2 * P, id(0xA), 12 * P), // contiguous with the previous one
            m(6 * P, P, NIL_BUILD, 5 * P),
            m(7 * P, P, NIL_BUILD, 0),
        ];
        h.validate().unwrap();
        let child = child_header(
            &h,
            id(0xC),
            &DiffMetadata {
                block_size: 4096,
                ..DiffMetadata::default()
            },
        )
        .unwrap();
        assert_eq!(
            child.mappings,
            vec![
                m(0, 2 * P, id(0xA), 0),
                m(2 * P, 4 * P, id(0xA), 10 * P),
                m(6 * P, 2 * P, NIL_BUILD, 0),
            ]
        );
        assert!(child.builds.is_empty(), "V3 parents give no builds section");
    }

    #[test]
    fn hugepage_blocks() {
        let huge = 2u64 << 20;
        let h = Header::new_empty(id(0xA), 4 * huge, huge, 5).unwrap();
        let diff = DiffMetadata {
            block_size: huge,
            dirty: vec![1..2, 3..4],
            empty: vec![],
        };
        let child = child_header(&h, id(0xC), &diff).unwrap();
        assert_eq!(
            child.mappings,
            vec![
                m(0, huge, NIL_BUILD, 0),
                m(huge, huge, id(0xC), 0),
                m(2 * huge, huge, NIL_BUILD, 0),
                m(3 * huge, huge, id(0xC), huge),
            ]
        );
        assert_eq!(Header::parse(&child.to_bytes().unwrap()).unwrap(), child);
    }

    #[test]
    fn bad_diffs_are_rejected() {
        let p = parent();
        let err =
            |diff: DiffMetadata, new: BuildId| child_header(&p, new, &diff).unwrap_err().kind();
        let d = |block_size, dirty: Vec<Range<u64>>, empty: Vec<Range<u64>>| DiffMetadata {
            block_size,
            dirty,
            empty,
        };
        assert_eq!(
            err(d(0, vec![], vec![]), id(0xC)),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            err(d(1000, vec![], vec![]), id(0xC)),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            err(d(4096, vec![15..17], vec![]), id(0xC)),
            ErrorKind::OutOfBounds
        );
        assert_eq!(
            err(d(4096, vec![], vec![16..17]), id(0xC)),
            ErrorKind::OutOfBounds
        );
        assert_eq!(
            err(d(8192, vec![7..9], vec![]), id(0xC)),
            ErrorKind::OutOfBounds
        );
        assert_eq!(
            err(d(4096, vec![u64::MAX - 1..u64::MAX], vec![]), id(0xC)),
            ErrorKind::OutOfBounds
        );
        assert_eq!(
            err(d(4096, vec![4..6, 2..3], vec![]), id(0xC)),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            err(d(4096, vec![2..6, 5..7], vec![]), id(0xC)),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            err(d(4096, vec![], vec![5..3]), id(0xC)),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            err(d(4096, vec![1..2], vec![]), NIL_BUILD),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            err(d(4096, vec![1..2], vec![]), id(0xB)),
            ErrorKind::InvalidArgument
        );
        // Empty ranges are ignored.
        assert!(child_header(&p, id(0xC), &d(4096, vec![3..3], vec![9..9])).is_ok());
    }

    // ---------------------------------------------------------------------------------------------
    // Model check
    // ---------------------------------------------------------------------------------------------

    /// Every page of every build's data file holds a distinct label; the model image is the label
    /// each device page reads as (0 = zeros).
    struct Model {
        data: HashMap<BuildId, Vec<u64>>,
    }

    impl Model {
        /// Reads the whole device through `header.resolve`, page by page.
        fn flatten(&self, header: &Header) -> Vec<u64> {
            let pages = header.metadata.size.div_ceil(P);
            (0..pages)
                .map(|p| {
                    let r = header.resolve(p * P).unwrap();
                    assert!(r.length >= P && r.length.is_multiple_of(P));
                    if r.build_id.is_nil() {
                        0
                    } else {
                        self.data[&r.build_id][usize::try_from(r.offset / P).unwrap()]
                    }
                })
                .collect()
        }
    }

    /// Maximal runs of `true` in `bits`, as block ranges; `split` breaks some runs in two (adjacent
    /// ranges must behave like one).
    fn runs(bits: &[bool], split: &[bool]) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (i, (&b, &cut)) in bits.iter().zip(split).enumerate() {
            let i = i as u64;
            if !b {
                continue;
            }
            match out.last_mut() {
                Some(r) if r.end == i && !cut => r.end = i + 1,
                _ => out.push(i..i + 1),
            }
        }
        out
    }

    fn assert_maximal(h: &Header) {
        for w in h.mappings.windows(2) {
            let (a, b) = (w[0], w[1]);
            let mergeable = a.build_id == b.build_id
                && (a.is_nil() || a.build_storage_offset + a.length == b.build_storage_offset);
            assert!(!mergeable, "adjacent runs not merged: {a:?} {b:?}");
        }
    }

    #[derive(Debug, Clone)]
    struct Generation {
        dirty: Vec<bool>,
        empty: Vec<bool>,
        split: Vec<bool>,
    }

    type BaseRuns = Vec<(u64, u64)>;

    fn scenario() -> impl Strategy<Value = (u64, u64, u64, BaseRuns, Vec<Generation>)> {
        (1u64..3, 1u64..20, prop_oneof![Just(3u64), Just(4), Just(5)]).prop_flat_map(
            |(block_pages, blocks, version)| {
                let n = usize::try_from(blocks).unwrap();
                let generation = (
                    prop::collection::vec(prop::bool::weighted(0.3), n),
                    prop::collection::vec(prop::bool::weighted(0.2), n),
                    prop::collection::vec(prop::bool::weighted(0.3), n),
                )
                    .prop_map(|(dirty, empty, split)| Generation {
                        dirty,
                        empty,
                        split,
                    });
                (
                    Just(block_pages),
                    Just(blocks),
                    Just(version),
                    // The base layer: runs of (pages, storage page) of build 1, scattered so that
                    // same-build neighbours are often not storage-contiguous.
                    prop::collection::vec((1u64..4, 0u64..40), 1..40),
                    prop::collection::vec(generation, 1..7),
                )
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Applying each generation's child header over the model reproduces the expected image:
        /// dirty blocks read the new build's data, empty blocks read zeros, everything else is
        /// unchanged; runs stay maximal; ancestor frame tables cover exactly what is referenced.
        #[test]
        fn child_headers_reproduce_the_flattened_image(
            (block_pages, blocks, version, base_runs, generations) in scenario()
        ) {
            let bs = block_pages * P;
            let size = blocks * bs;
            let pages = usize::try_from(size / P).unwrap();
            let bp = usize::try_from(block_pages).unwrap();
            let base = id(1);
            let mut model = Model { data: HashMap::new() };
            let base_pages = pages as u64 + 44;
            model.data.insert(base, (0..base_pages).map(|p| (1 << 32) | p).collect());
            let mut header = Header::new_base(base, size, bs, version).unwrap();
            header.mappings.clear();
            let mut pos = 0;
            for (len, storage) in base_runs.iter().copied().chain(std::iter::once((u64::MAX, 0))) {
                let len = len.min(pages as u64 - pos);
                header.mappings.push(m(pos * P, len * P, base, storage * P));
                pos += len;
                if pos == pages as u64 {
                    break;
                }
            }
            header.validate().unwrap();
            if version >= 4 {
                header.builds.insert(base, BuildData {
                    size: base_pages * P,
                    checksum: [1; 32],
                    frames: table(base_pages, 1),
                });
            }
            let mut expected = model.flatten(&header);

            for (g, gen_) in generations.iter().enumerate() {
                let new = id(u8::try_from(g + 2).unwrap());
                let diff = DiffMetadata {
                    block_size: bs,
                    dirty: runs(&gen_.dirty, &gen_.split),
                    empty: runs(&gen_.empty, &gen_.split),
                };
                let child = child_header(&header, new, &diff).unwrap();

                // The new build's packed data file, and the expected image.
                let mut packed = Vec::new();
                for (b, &dirty) in gen_.dirty.iter().enumerate() {
                    for p in 0..bp {
                        let page = b * bp + p;
                        if dirty {
                            let label = ((g as u64 + 2) << 32) | packed.len() as u64;
                            packed.push(label);
                            expected[page] = label;
                        } else if gen_.empty[b] {
                            expected[page] = 0;
                        }
                    }
                }
                prop_assert_eq!(packed.len() as u64 * P, diff.dirty_blocks() * bs);
                model.data.insert(new, packed.clone());

                prop_assert_eq!(model.flatten(&child), expected.clone());
                assert_maximal(&child);
                prop_assert_eq!(child.metadata.generation, g as u64 + 1);
                prop_assert_eq!(child.metadata.base_build_id, base);
                prop_assert_eq!(child.metadata.version, version);

                // Ancestor tables: every referenced storage page lies in a kept frame, and every
                // kept frame is referenced.
                for (bid, bd) in &child.builds {
                    let ranges = child.referenced_ranges(bid);
                    prop_assert!(!ranges.is_empty(), "unreferenced build {} carried", bid);
                    for &(s, e) in &ranges {
                        for off in (s..e).step_by(4096) {
                            prop_assert!(bd.frames.locate(off).is_some());
                        }
                    }
                    for f in bd.frames.frames() {
                        prop_assert!(ranges.iter().any(|&(s, e)| s < f.end_u() && f.start_u < e));
                    }
                }

                // Caller's step: add the self entry, then store.
                let mut stored = child;
                if version >= 4 {
                    stored.builds.insert(new, BuildData {
                        size: packed.len() as u64 * P,
                        checksum: [0; 32],
                        frames: if packed.is_empty() {
                            FrameTable::uncompressed()
                        } else {
                            table(packed.len() as u64, 1)
                        },
                    });
                }
                let back = Header::parse(&stored.to_bytes().unwrap()).unwrap();
                prop_assert_eq!(&back, &stored);
                header = back;
            }
        }
    }
}
