//! Header parsing and writing: hand-written byte vectors (built from the byte layout in the
//! reference, not by our serializer), malformed input, and round trips.

#[cfg(test)]
mod tests {

    use std::collections::BTreeMap;
    use std::io::Write;

    use lz4_flex::frame::{BlockSize, FrameEncoder, FrameInfo};
    use proptest::prelude::*;
    use thaw_codec::header::{MAX_BODY_LEN, MAX_BUILDS, MAX_MAPPINGS};
    use thaw_codec::{
        BuildData, BuildId, CompressionType, ErrorKind, Frame, FrameTable, Header, Mapping,
        Metadata, NIL_BUILD, PAGE_SIZE,
    };

    const P: u64 = PAGE_SIZE;

    fn id(byte: u8) -> BuildId {
        BuildId::from_bytes([byte; 16])
    }

    /// Little-endian byte pushes, written field by field.
    #[derive(Default)]
    struct Bytes(Vec<u8>);

    impl Bytes {
        fn u8(&mut self, v: u8) -> &mut Self {
            self.0.push(v);
            self
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn i64(&mut self, v: i64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn i32(&mut self, v: i32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn raw(&mut self, v: &[u8]) -> &mut Self {
            self.0.extend_from_slice(v);
            self
        }
        fn id(&mut self, v: BuildId) -> &mut Self {
            self.raw(v.as_bytes())
        }
        /// Metadata: Version, BlockSize, Size, Generation, BuildId, BaseBuildId.
        fn metadata(&mut self, version: u64, block: u64, size: u64, generation: u64) -> &mut Self {
            self.u64(version)
                .u64(block)
                .u64(size)
                .u64(generation)
                .id(id(0xB1))
                .id(id(0xBA))
        }
        /// A 40-byte mapping record.
        fn record(&mut self, offset: u64, length: u64, build: BuildId, storage: u64) -> &mut Self {
            self.u64(offset).u64(length).id(build).u64(storage)
        }
        /// A builds-section entry without its frame table.
        fn build_head(&mut self, build: BuildId, size: i64, checksum: u8) -> &mut Self {
            self.id(build).i64(size).raw(&[checksum; 32])
        }
        fn frame(&mut self, su: i64, sc: i64, zu: i32, zc: i32) -> &mut Self {
            self.i64(su).i64(sc).i32(zu).i32(zc)
        }
    }

    /// e2b's V4/V5 framing around a hand-written decoded block: flags, length, LZ4 frame (4 MB
    /// blocks, block and content checksums on), produced with lz4_flex directly.
    fn wrap_body(flags: u8, block: &[u8]) -> Vec<u8> {
        let mut out = vec![flags];
        out.extend_from_slice(&u32::try_from(block.len()).unwrap().to_le_bytes());
        let info = FrameInfo::new()
            .block_size(BlockSize::Max4MB)
            .block_checksums(true)
            .content_checksum(true);
        let mut enc = FrameEncoder::with_frame_info(info, out);
        enc.write_all(block).unwrap();
        enc.finish().unwrap()
    }

    fn m(offset: u64, length: u64, build: BuildId, storage: u64) -> Mapping {
        Mapping {
            offset,
            length,
            build_id: build,
            build_storage_offset: storage,
        }
    }

    fn kind(input: &[u8]) -> ErrorKind {
        match Header::parse(input) {
            Ok(h) => panic!("expected an error, parsed {h:?}"),
            Err(e) => e.kind(),
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Hand-written vectors
    // ---------------------------------------------------------------------------------------------

    fn v3_vector() -> Vec<u8> {
        let mut b = Bytes::default();
        b.metadata(3, 4096, 5 * P, 2)
            .record(0, 2 * P, id(0xA), 0)
            .record(2 * P, P, NIL_BUILD, 0)
            .record(3 * P, 2 * P, id(0xB), 7 * P);
        b.0
    }

    #[test]
    fn v3_vector_parses() {
        let h = Header::parse(&v3_vector()).unwrap();
        assert_eq!(
            h.metadata,
            Metadata {
                version: 3,
                block_size: 4096,
                size: 5 * P,
                generation: 2,
                build_id: id(0xB1),
                base_build_id: id(0xBA),
            }
        );
        assert_eq!(h.metadata.format(), 3);
        assert!(!h.incomplete);
        assert!(h.builds.is_empty(), "V3 headers carry no builds section");
        assert_eq!(
            h.mappings,
            vec![
                m(0, 2 * P, id(0xA), 0),
                m(2 * P, P, NIL_BUILD, 0),
                m(3 * P, 2 * P, id(0xB), 7 * P),
            ]
        );
        // Writing reproduces the vector byte for byte.
        assert_eq!(h.to_bytes().unwrap(), v3_vector());
        // GetShiftedMapping.
        let r = h.resolve(4 * P).unwrap();
        assert_eq!((r.build_id, r.offset, r.length), (id(0xB), 8 * P, P));
        let r = h.resolve(P).unwrap();
        assert_eq!((r.build_id, r.offset, r.length), (id(0xA), P, P));
        assert_eq!(h.resolve(5 * P).unwrap_err().kind(), ErrorKind::OutOfBounds);
        assert_eq!(
            h.resolve(P + 1).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(h.referenced_ranges(&id(0xB)), vec![(7 * P, 9 * P)]);
    }

    #[test]
    fn v3_without_records_maps_everything_to_itself() {
        let mut b = Bytes::default();
        b.metadata(3, 4096, 0x1800, 0);
        let h = Header::parse(&b.0).unwrap();
        assert_eq!(h.mappings, vec![m(0, 0x2000, id(0xB1), 0)]);
    }

    #[test]
    fn v1_legacy_header_is_tolerated() {
        // Version 1 synthetic-style header: size not 4 KiB aligned, mapping of exactly `size` bytes,
        // 2 MiB block size.
        let mut b = Bytes::default();
        b.metadata(1, 2 << 20, 0x1234, 1)
            .record(0, 0x1234, id(0xA), 0);
        let h = Header::parse(&b.0).unwrap();
        assert_eq!(h.metadata.format(), 1);
        // Unaligned lookups are allowed below version 3.
        let r = h.resolve(0x10).unwrap();
        assert_eq!((r.offset, r.length), (0x10, 0x1224));
        assert_eq!(
            h.resolve(0x1234).unwrap_err().kind(),
            ErrorKind::OutOfBounds
        );
        // The same mapping is rejected from version 3 on.
        let mut b = Bytes::default();
        b.metadata(3, 2 << 20, 0x1234, 1)
            .record(0, 0x1234, id(0xA), 0);
        assert_eq!(kind(&b.0), ErrorKind::Corrupt);
    }

    /// The decoded V4 block: builds written out of order (B before A), a sparse zstd table for A,
    /// a zero entry for B, then three records.
    fn v4_block() -> Vec<u8> {
        let mut b = Bytes::default();
        b.u32(2);
        b.build_head(id(0xB), 0, 0).u32(0).u32(0);
        b.build_head(id(0xA), 0x3000, 0xAB)
            .u32(1)
            .u32(2)
            .frame(0, 0, 0x1000, 0x100)
            .frame(0x2000, 0x300, 0x1000, 0x80);
        b.u32(3)
            .record(0, 2 * P, id(0xA), 0x1000)
            .record(2 * P, 2 * P, NIL_BUILD, 0)
            .record(4 * P, P, id(0xB), 0);
        b.0
    }

    fn v4_vector(flags: u8) -> Vec<u8> {
        let mut b = Bytes::default();
        b.metadata(4, 4096, 5 * P, 3)
            .raw(&wrap_body(flags, &v4_block()));
        b.0
    }

    #[test]
    fn v4_vector_parses() {
        let h = Header::parse(&v4_vector(0)).unwrap();
        assert_eq!(h.metadata.format(), 4);
        assert!(!h.incomplete);
        assert_eq!(
            h.mappings,
            vec![
                m(0, 2 * P, id(0xA), 0x1000),
                m(2 * P, 2 * P, NIL_BUILD, 0),
                m(4 * P, P, id(0xB), 0),
            ]
        );
        assert_eq!(h.builds.len(), 2);
        let a = h.build_data(&id(0xA)).unwrap();
        assert_eq!(a.size, 0x3000);
        assert_eq!(a.checksum, [0xAB; 32]);
        assert_eq!(a.frames.compression(), CompressionType::Zstd);
        assert_eq!(
            a.frames.frames(),
            &[
                Frame {
                    start_u: 0,
                    start_c: 0,
                    size_u: 0x1000,
                    size_c: 0x100
                },
                Frame {
                    start_u: 0x2000,
                    start_c: 0x300,
                    size_u: 0x1000,
                    size_c: 0x80
                },
            ]
        );
        assert_eq!(a.frames.locate(0x1000), None, "sparse gap");
        assert_eq!(a.frames.locate(0x2fff), Some(1));
        let b = h.build_data(&id(0xB)).unwrap();
        assert!(b.is_zero());

        // Re-serialized, the builds section comes out sorted (A before B) and parses back equal.
        let again = Header::parse(&h.to_bytes().unwrap()).unwrap();
        assert_eq!(again, h);
    }

    #[test]
    fn v4_incomplete_flag_is_read_but_never_written() {
        let h = Header::parse(&v4_vector(1)).unwrap();
        assert!(h.incomplete);
        assert_eq!(h.to_bytes().unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(kind(&v4_vector(0x02)), ErrorKind::Unsupported);
    }

    /// The decoded V5 block. Size 16 pages. Mapping (pages): nil [0,2) omitted, C [2,5) -> 5,
    /// A [5,7) -> 0 (storage delta -5), nil [7,10) omitted, C [10,11) -> 300 (two-byte varint),
    /// nil tail [11,16) omitted.
    fn v5_block() -> Vec<u8> {
        let mut b = Bytes::default();
        // Builds section: C with a one-frame LZ4 table.
        b.u32(1)
            .build_head(id(0xC), 301 * 4096, 0x5C)
            .u32(2)
            .u32(1)
            .frame(0, 0, 4096, 77);
        // Build-id table in first-appearance order.
        b.u32(2).id(id(0xC)).id(id(0xA));
        b.u32(3);
        // Offset deltas (pages): 2, 3, 5.
        b.raw(&[0x02, 0x03, 0x05]);
        // Lengths (pages): 3, 2, 1.
        b.raw(&[0x03, 0x02, 0x01]);
        // Storage deltas, zigzag: +5 -> 10, -5 -> 9, +300 -> 600 = 0xd8 0x04.
        b.raw(&[0x0a, 0x09, 0xd8, 0x04]);
        // Build indices: C, A, C.
        b.raw(&[0x00, 0x01, 0x00]);
        b.0
    }

    fn v5_vector() -> Vec<u8> {
        let mut b = Bytes::default();
        b.metadata(5, 4096, 16 * P, 7)
            .raw(&wrap_body(0, &v5_block()));
        b.0
    }

    #[test]
    fn v5_vector_parses_with_gaps_and_negative_delta() {
        let h = Header::parse(&v5_vector()).unwrap();
        assert_eq!(h.metadata.format(), 5);
        assert_eq!(
            h.mappings,
            vec![
                m(0, 2 * P, NIL_BUILD, 0),
                m(2 * P, 3 * P, id(0xC), 5 * P),
                m(5 * P, 2 * P, id(0xA), 0),
                m(7 * P, 3 * P, NIL_BUILD, 0),
                m(10 * P, P, id(0xC), 300 * P),
                m(11 * P, 5 * P, NIL_BUILD, 0),
            ]
        );
        let c = h.build_data(&id(0xC)).unwrap();
        assert_eq!(c.size, 301 * 4096);
        assert_eq!(c.frames.compression(), CompressionType::Lz4);
        assert_eq!(c.frames.frames().len(), 1);
        assert!(h.build_data(&id(0xA)).is_none());
        // Writing produces the same decoded block (and so the same header).
        let bytes = h.to_bytes().unwrap();
        assert_eq!(Header::parse(&bytes).unwrap(), h);
        let r = h.resolve(3 * P).unwrap();
        assert_eq!((r.build_id, r.offset, r.length), (id(0xC), 6 * P, 2 * P));
        let r = h.resolve(8 * P).unwrap();
        assert_eq!((r.build_id, r.length), (NIL_BUILD, 2 * P));
    }

    #[test]
    fn v5_writer_matches_hand_written_block() {
        let h = Header::parse(&v5_vector()).unwrap();
        let bytes = h.to_bytes().unwrap();
        // Decode our body and compare with the hand-written decoded block.
        let declared = u32::from_le_bytes(bytes[65..69].try_into().unwrap()) as usize;
        let mut dec = lz4_flex::frame::FrameDecoder::new(&bytes[69..]);
        let mut block = Vec::new();
        std::io::Read::read_to_end(&mut dec, &mut block).unwrap();
        assert_eq!(declared, block.len());
        assert_eq!(block, v5_block());
    }

    #[test]
    fn v5_without_entries_is_all_nil() {
        let mut block = Bytes::default();
        block.u32(0).u32(0).u32(0);
        let mut b = Bytes::default();
        b.metadata(5, 4096, 0x2800, 0).raw(&wrap_body(0, &block.0));
        let h = Header::parse(&b.0).unwrap();
        assert_eq!(h.mappings, vec![m(0, 0x3000, NIL_BUILD, 0)]);
    }

    #[test]
    fn unsupported_versions() {
        for version in [0u64, 6, 0xFFFF, 0x1_0000] {
            let mut b = Bytes::default();
            b.metadata(version, 4096, P, 0);
            assert_eq!(kind(&b.0), ErrorKind::Unsupported, "version {version:#x}");
        }
        // High bits above the format are ignored for dispatch.
        let mut b = Bytes::default();
        b.metadata(0x7_0003, 4096, P, 0).record(0, P, id(1), 0);
        assert_eq!(Header::parse(&b.0).unwrap().metadata.format(), 3);
    }

    // ---------------------------------------------------------------------------------------------
    // Malformed input
    // ---------------------------------------------------------------------------------------------

    #[test]
    fn truncated_v3_never_panics() {
        let full = v3_vector();
        for cut in 0..full.len() {
            let res = Header::parse(&full[..cut]);
            match cut {
                0..64 => assert_eq!(res.unwrap_err().kind(), ErrorKind::Truncated),
                // No records at all: the documented default mapping.
                64 => assert_eq!(res.unwrap().mappings.len(), 1),
                c if (c - 64) % 40 != 0 => {
                    assert_eq!(res.unwrap_err().kind(), ErrorKind::Truncated, "cut {cut}")
                }
                // Whole records missing: the mappings no longer cover the device.
                _ => assert_eq!(res.unwrap_err().kind(), ErrorKind::Corrupt, "cut {cut}"),
            }
        }
    }

    #[test]
    fn truncated_v4_v5_always_fail() {
        for full in [v4_vector(0), v5_vector()] {
            for cut in 0..full.len() {
                let err = Header::parse(&full[..cut]).unwrap_err();
                assert!(
                    matches!(
                        err.kind(),
                        ErrorKind::Truncated | ErrorKind::Corrupt | ErrorKind::SizeMismatch
                    ),
                    "cut {cut}: {err}"
                );
            }
        }
    }

    #[test]
    fn flipped_bytes_never_panic_and_body_flips_fail() {
        for full in [v3_vector(), v4_vector(0), v5_vector()] {
            for at in 0..full.len() {
                for mask in [0x01u8, 0x80, 0xFF] {
                    let mut bad = full.clone();
                    bad[at] ^= mask;
                    let res = Header::parse(&bad);
                    // V4/V5 bodies (flags, length, LZ4 stream with checksums): every change past
                    // the metadata is detected, except flipping the incomplete bit.
                    let lz4_header = full.len() > 69 && full != v3_vector();
                    if lz4_header && at >= 64 && !(at == 64 && mask == 0x01) {
                        assert!(res.is_err(), "flip {mask:#x} at {at} accepted");
                    }
                }
            }
        }
    }

    #[test]
    fn trailing_garbage_after_lz4_stream_is_rejected() {
        let mut bad = v4_vector(0);
        bad.push(0);
        assert_eq!(kind(&bad), ErrorKind::Corrupt);
        // A second (empty) LZ4 frame after the first is trailing data too.
        let mut bad = v4_vector(0);
        let empty = wrap_body(0, &[]);
        bad.extend_from_slice(&empty[5..]);
        assert_eq!(kind(&bad), ErrorKind::Corrupt);
    }

    #[test]
    fn declared_length_mismatch() {
        let block = v4_block();
        for delta in [-1i64, 1, 1000] {
            let mut body = wrap_body(0, &block);
            let len = u32::try_from(i64::try_from(block.len()).unwrap() + delta).unwrap();
            body[1..5].copy_from_slice(&len.to_le_bytes());
            let mut b = Bytes::default();
            b.metadata(4, 4096, 5 * P, 0).raw(&body);
            assert_eq!(kind(&b.0), ErrorKind::SizeMismatch, "delta {delta}");
        }
    }

    /// A V4 or V5 header around a hand-written block.
    fn with_block(version: u64, size: u64, block: &[u8]) -> Vec<u8> {
        let mut b = Bytes::default();
        b.metadata(version, 4096, size, 0).raw(&wrap_body(0, block));
        b.0
    }

    #[test]
    fn huge_declared_counts_are_rejected() {
        // uncompressedBlockLen above the cap.
        let mut b = Bytes::default();
        b.metadata(4, 4096, P, 0)
            .u8(0)
            .u32(MAX_BODY_LEN + 1)
            .raw(&[0; 16]);
        assert_eq!(kind(&b.0), ErrorKind::TooLarge);
        let mut b = Bytes::default();
        b.metadata(5, 4096, P, 0).u8(0).u32(u32::MAX);
        assert_eq!(kind(&b.0), ErrorKind::TooLarge);
        // uncompressedBlockLen at the cap but a tiny stream: decodes short.
        let mut body = wrap_body(0, &[0, 0, 0, 0, 0, 0, 0, 0]);
        body[1..5].copy_from_slice(&MAX_BODY_LEN.to_le_bytes());
        let mut b = Bytes::default();
        b.metadata(4, 4096, 0, 0).raw(&body);
        assert_eq!(kind(&b.0), ErrorKind::SizeMismatch);

        for version in [4, 5] {
            // numBuilds above the cap, and below the cap but beyond the bytes present.
            let mut blk = Bytes::default();
            blk.u32(u32::MAX);
            assert_eq!(kind(&with_block(version, P, &blk.0)), ErrorKind::TooLarge);
            let mut blk = Bytes::default();
            blk.u32(MAX_BUILDS).raw(&[0; 100]);
            assert_eq!(kind(&with_block(version, P, &blk.0)), ErrorKind::Truncated);
            // nFrames above the cap, and beyond the bytes present.
            let mut blk = Bytes::default();
            blk.u32(1).build_head(id(1), 0, 0).u32(1).u32(u32::MAX);
            assert_eq!(kind(&with_block(version, P, &blk.0)), ErrorKind::TooLarge);
            let mut blk = Bytes::default();
            blk.u32(1)
                .build_head(id(1), 0, 0)
                .u32(1)
                .u32(1 << 20)
                .raw(&[0; 64]);
            assert_eq!(kind(&with_block(version, P, &blk.0)), ErrorKind::Truncated);
        }
        // V4 numMappings.
        let mut blk = Bytes::default();
        blk.u32(0).u32(u32::MAX);
        assert_eq!(kind(&with_block(4, P, &blk.0)), ErrorKind::TooLarge);
        let mut blk = Bytes::default();
        blk.u32(0).u32(MAX_MAPPINGS).record(0, P, id(1), 0);
        assert_eq!(kind(&with_block(4, P, &blk.0)), ErrorKind::Truncated);
        // V5 M and N.
        let mut blk = Bytes::default();
        blk.u32(0).u32(MAX_BUILDS + 1);
        assert_eq!(kind(&with_block(5, P, &blk.0)), ErrorKind::TooLarge);
        let mut blk = Bytes::default();
        blk.u32(0).u32(1000).raw(&[0; 64]);
        assert_eq!(kind(&with_block(5, P, &blk.0)), ErrorKind::Truncated);
        let mut blk = Bytes::default();
        blk.u32(0).u32(0).u32(u32::MAX);
        assert_eq!(kind(&with_block(5, P, &blk.0)), ErrorKind::TooLarge);
        let mut blk = Bytes::default();
        blk.u32(0).u32(0).u32(MAX_MAPPINGS).raw(&[1; 64]);
        assert_eq!(kind(&with_block(5, P, &blk.0)), ErrorKind::Truncated);
    }

    /// A V4 header whose only build has the given hand-written frame table.
    fn v4_with_table(ct: u32, frames: &[(i64, i64, i32, i32)]) -> Vec<u8> {
        let mut blk = Bytes::default();
        blk.u32(1)
            .build_head(id(1), 0, 0)
            .u32(ct)
            .u32(u32::try_from(frames.len()).unwrap());
        for &(su, sc, zu, zc) in frames {
            blk.frame(su, sc, zu, zc);
        }
        blk.u32(1).record(0, P, id(1), 0);
        with_block(4, P, &blk.0)
    }

    #[test]
    fn bad_frame_tables_are_rejected_at_parse() {
        let ok = v4_with_table(1, &[(0, 0, 4096, 10), (4096, 10, 4096, 10)]);
        assert!(Header::parse(&ok).is_ok());
        type Case<'a> = (&'a str, u32, &'a [(i64, i64, i32, i32)], ErrorKind);
        let cases: &[Case<'_>] = &[
            (
                "out of order",
                1,
                &[(4096, 10, 4096, 10), (0, 0, 4096, 10)],
                ErrorKind::Corrupt,
            ),
            (
                "overlap in U",
                1,
                &[(0, 0, 4096, 10), (4000, 10, 4096, 10)],
                ErrorKind::Corrupt,
            ),
            (
                "overlap in C",
                1,
                &[(0, 0, 4096, 10), (4096, 5, 4096, 10)],
                ErrorKind::Corrupt,
            ),
            ("zero size U", 1, &[(0, 0, 0, 10)], ErrorKind::Corrupt),
            ("zero size C", 2, &[(0, 0, 4096, 0)], ErrorKind::Corrupt),
            (
                "negative start U",
                1,
                &[(-4096, 0, 4096, 10)],
                ErrorKind::Corrupt,
            ),
            (
                "negative start C",
                1,
                &[(0, -1, 4096, 10)],
                ErrorKind::Corrupt,
            ),
            ("negative size", 1, &[(0, 0, -4096, 10)], ErrorKind::Corrupt),
            (
                "end overflows i64",
                1,
                &[(i64::MAX - 100, 0, 4096, 10)],
                ErrorKind::Corrupt,
            ),
            (
                "codec none with frames",
                0,
                &[(0, 0, 4096, 10)],
                ErrorKind::Corrupt,
            ),
            (
                "unknown codec",
                9,
                &[(0, 0, 4096, 10)],
                ErrorKind::Unsupported,
            ),
        ];
        for &(name, ct, frames, expected) in cases {
            assert_eq!(kind(&v4_with_table(ct, frames)), expected, "{name}");
        }
    }

    #[test]
    fn builds_section_rules() {
        // Duplicate entries are corrupt; a negative size too.
        let mut blk = Bytes::default();
        blk.u32(2)
            .build_head(id(1), 0, 0)
            .u32(0)
            .u32(0)
            .build_head(id(1), 0, 0)
            .u32(0)
            .u32(0)
            .u32(1)
            .record(0, P, id(1), 0);
        assert_eq!(kind(&with_block(4, P, &blk.0)), ErrorKind::Corrupt);
        let mut blk = Bytes::default();
        blk.u32(1)
            .build_head(id(1), -1, 0)
            .u32(0)
            .u32(0)
            .u32(1)
            .record(0, P, id(1), 0);
        assert_eq!(kind(&with_block(4, P, &blk.0)), ErrorKind::Corrupt);
        // Bytes after the mapping section.
        let mut blk = Bytes::default();
        blk.u32(0).u32(1).record(0, P, id(1), 0).u8(0);
        assert_eq!(kind(&with_block(4, P, &blk.0)), ErrorKind::Corrupt);
    }

    #[test]
    fn v5_mapping_section_rules() {
        let section = |m: &[BuildId], n: u32, cols: &[u8]| {
            let mut blk = Bytes::default();
            blk.u32(0).u32(u32::try_from(m.len()).unwrap());
            for &b in m {
                blk.id(b);
            }
            blk.u32(n).raw(cols);
            with_block(5, 8 * P, &blk.0)
        };
        // Valid: one entry [1,3) -> 0.
        assert!(Header::parse(&section(&[id(1)], 1, &[1, 2, 0, 0])).is_ok());
        let cases: &[(&str, u32, &[u8])] = &[
            ("zero length", 1, &[1, 0, 0, 0]),
            ("overlap", 2, &[1, 0, 2, 2, 0, 0, 0, 0]),
            ("past the size", 1, &[7, 2, 0, 0]),
            ("negative storage", 1, &[0, 1, 1, 0]),
            ("build index out of range", 1, &[0, 1, 0, 1]),
            (
                "offset beyond u32 pages",
                1,
                &[0xff, 0xff, 0xff, 0xff, 0x10, 1, 0, 0],
            ),
            (
                "varint overflow",
                1,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            ),
            ("trailing bytes", 1, &[1, 2, 0, 0, 0]),
        ];
        for &(name, n, cols) in cases {
            assert_eq!(
                kind(&section(&[id(1)], n, cols)),
                ErrorKind::Corrupt,
                "{name}"
            );
        }
        // Columns cut short.
        assert_eq!(
            kind(&section(&[id(1)], 2, &[1, 1, 1, 1, 1, 1, 0x80])),
            ErrorKind::Truncated
        );
        // Size too large for u32 pages.
        let mut blk = Bytes::default();
        blk.u32(0).u32(0).u32(0);
        assert_eq!(kind(&with_block(5, u64::MAX, &blk.0)), ErrorKind::TooLarge);
    }

    #[test]
    fn invalid_mappings_are_rejected() {
        let v3 = |records: &[(u64, u64)]| {
            let mut b = Bytes::default();
            b.metadata(3, 4096, 4 * P, 0);
            for &(o, l) in records {
                b.record(o, l, id(1), o);
            }
            b.0
        };
        assert!(Header::parse(&v3(&[(0, 2 * P), (2 * P, 2 * P)])).is_ok());
        for (name, recs) in [
            ("gap", vec![(0, P), (2 * P, 2 * P)]),
            ("overlap", vec![(0, 2 * P), (P, 3 * P)]),
            ("unsorted", vec![(2 * P, 2 * P), (0, 2 * P)]),
            ("short", vec![(0, 3 * P)]),
            ("long", vec![(0, 5 * P)]),
            ("zero length", vec![(0, 0), (0, 4 * P)]),
            ("unaligned", vec![(0, 100), (100, 4 * P - 100)]),
            ("overflow", vec![(0, 4 * P), (4 * P, u64::MAX)]),
        ] {
            assert_eq!(kind(&v3(&recs)), ErrorKind::Corrupt, "{name}");
        }
        // Zero block size.
        let mut b = Bytes::default();
        b.metadata(3, 0, P, 0).record(0, P, id(1), 0);
        assert_eq!(kind(&b.0), ErrorKind::Corrupt);
    }

    #[test]
    fn base_and_empty_constructors() {
        let h = Header::new_base(id(9), 10 * P + 1, 4096, 4).unwrap();
        assert_eq!(h.mappings, vec![m(0, 11 * P, id(9), 0)]);
        assert_eq!(h.metadata.base_build_id, id(9));
        assert_eq!(h.metadata.generation, 0);
        assert_eq!(Header::parse(&h.to_bytes().unwrap()).unwrap(), h);
        let e = Header::new_empty(id(9), 2 << 20, 2 << 20, 5).unwrap();
        assert_eq!(e.mappings, vec![m(0, 2 << 20, NIL_BUILD, 0)]);
        assert_eq!(Header::parse(&e.to_bytes().unwrap()).unwrap(), e);
        assert_eq!(
            Header::new_base(id(9), P, 0, 3).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        let z = Header::new_base(id(9), 0, 4096, 3).unwrap();
        assert!(z.mappings.is_empty());
        assert_eq!(Header::parse(&z.to_bytes().unwrap()).unwrap(), z);
    }

    // ---------------------------------------------------------------------------------------------
    // Round trips
    // ---------------------------------------------------------------------------------------------

    fn arb_table() -> impl Strategy<Value = FrameTable> {
        let frames = prop::collection::vec((0u64..3, 1u32..50_000, 0u64..3, 1u32..20_000), 1..6);
        prop_oneof![
            Just(FrameTable::uncompressed()),
            (
                prop_oneof![Just(CompressionType::Zstd), Just(CompressionType::Lz4)],
                frames
            )
                .prop_map(|(ct, specs)| {
                    let (mut u, mut c) = (0u64, 0u64);
                    let mut frames = Vec::new();
                    for (gap_u, size_u, gap_c, size_c) in specs {
                        u += gap_u * 4096;
                        c += gap_c * 17;
                        frames.push(Frame {
                            start_u: u,
                            start_c: c,
                            size_u,
                            size_c,
                        });
                        u += u64::from(size_u);
                        c += u64::from(size_c);
                    }
                    FrameTable::new(ct, frames).unwrap()
                }),
        ]
    }

    fn arb_build_data() -> impl Strategy<Value = BuildData> {
        (0u64..1 << 40, any::<[u8; 32]>(), arb_table()).prop_map(|(size, checksum, frames)| {
            BuildData {
                size,
                checksum,
                frames,
            }
        })
    }

    /// An arbitrary valid header of `version`: contiguous runs over `pages` pages (the size may end
    /// mid-page), each run nil or one of a few builds at a random page-aligned storage offset; for
    /// V4/V5 a builds section covering some of those builds plus unreferenced ones.
    fn arb_header(version: u64) -> impl Strategy<Value = Header> {
        let runs = prop::collection::vec((1u64..6, 0usize..4, 0u64..10_000, 0u64..50), 0..24);
        let builds = prop::collection::btree_map(0u8..8, arb_build_data(), 0..5);
        (
            runs,
            builds,
            0u64..4096,
            any::<u64>(),
            prop_oneof![Just(4096u64), Just(2 << 20)],
        )
            .prop_map(move |(runs, builds, short, generation, block_size)| {
                let pool = [NIL_BUILD, id(1), id(2), id(3)];
                let mut mappings = Vec::new();
                let mut pos = 0;
                for (len, which, storage, nil_storage) in runs {
                    let build = pool[which];
                    let storage = if build.is_nil() {
                        nil_storage * 4096
                    } else {
                        storage * 4096
                    };
                    mappings.push(m(pos, len * P, build, storage));
                    pos += len * P;
                }
                let size = if pos == 0 { 0 } else { pos - short.min(P - 1) };
                let mut h = Header {
                    metadata: Metadata {
                        version,
                        block_size,
                        size,
                        generation,
                        build_id: id(0xEE),
                        base_build_id: id(0xBA),
                    },
                    incomplete: false,
                    builds: BTreeMap::new(),
                    mappings,
                };
                if version >= 4 {
                    h.builds = builds.into_iter().map(|(k, v)| (id(k), v)).collect();
                }
                h
            })
    }

    /// What V5 cannot represent: it omits nil ranges and rebuilds them, so adjacent nil runs come
    /// back as one, with storage offset 0. Normalizing a header = applying exactly that.
    fn normalize_v5(h: &Header) -> Header {
        let mut out = h.clone();
        out.mappings.clear();
        for mut mp in h.mappings.iter().copied() {
            if mp.is_nil() {
                mp.build_storage_offset = 0;
                if let Some(last) = out.mappings.last_mut().filter(|l| l.is_nil()) {
                    last.length += mp.length;
                    continue;
                }
            }
            out.mappings.push(mp);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn v3_round_trip(h in prop_oneof![arb_header(1), arb_header(2), arb_header(3)]) {
            let bytes = h.to_bytes().unwrap();
            let back = Header::parse(&bytes).unwrap();
            prop_assert_eq!(&back, &h);
            prop_assert_eq!(back.to_bytes().unwrap(), bytes);
        }

        #[test]
        fn v4_round_trip(h in arb_header(4)) {
            let bytes = h.to_bytes().unwrap();
            let back = Header::parse(&bytes).unwrap();
            prop_assert_eq!(&back, &h);
            prop_assert_eq!(back.to_bytes().unwrap(), bytes);
        }

        #[test]
        fn v5_round_trip(h in arb_header(5)) {
            let bytes = h.to_bytes().unwrap();
            let back = Header::parse(&bytes).unwrap();
            prop_assert_eq!(&back, &normalize_v5(&h));
            prop_assert_eq!(back.to_bytes().unwrap(), bytes);
        }

        /// Any header, cut anywhere or with any byte changed, parses or fails: it never panics.
        #[test]
        fn mutated_headers_never_panic(
            h in prop_oneof![arb_header(3), arb_header(4), arb_header(5)],
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            mask in 1u8..,
        ) {
            let bytes = h.to_bytes().unwrap();
            let _ = Header::parse(&bytes[..cut.index(bytes.len())]);
            let mut bad = bytes.clone();
            let at = flip.index(bad.len());
            bad[at] ^= mask;
            let _ = Header::parse(&bad);
        }
    }
}
