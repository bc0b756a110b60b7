//! Property tests: encode/decode round trips and validation invariants over
//! generated impressions.

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use schema::{
    decode_envelope, derive_impression_id, parse_impression, parse_timestamp, BatchEnvelope, EventType, Impression,
    ParseContext, Period, Receipt, SeqRange, TriggerType,
};
use uuid::Uuid;

fn now() -> DateTime<Utc> {
    parse_timestamp("2026-06-01T00:00:00Z").unwrap()
}

fn site_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn impression(site: String) -> impl Strategy<Value = Impression> {
    (
        "[a-z0-9_]{1,40}\\.mp4",
        0i64..(5 * 365 * 86_400 * 1_000_000),
        0.0f64..3600.0,
        0.0f64..1.0,
        any::<bool>(),
        prop::sample::select(EventType::ALL),
        prop::sample::select(Period::ALL),
        prop::sample::select(TriggerType::ALL),
        prop::option::of(0i32..100_000),
        prop::option::of("[a-z0-9-]{1,20}"),
        1i64..1_000_000_000,
    )
        .prop_map(move |(file, micros, vd, frac, completed, et, p, tt, aud, vid, seq)| {
            let played_at = parse_timestamp("2021-01-01T00:00:00Z").unwrap() + Duration::microseconds(micros);
            Impression {
                impression_id: derive_impression_id(&site, &file, played_at),
                site_id: site.clone(),
                seq: Some(seq),
                video_id: vid,
                video_filename: file,
                played_at,
                duration_played: vd * frac,
                video_duration: vd,
                completed,
                event_type: et,
                period: p,
                trigger_type: tt,
                audience_estimate: aud,
            }
        })
}

proptest! {
    #[test]
    fn valid_impressions_validate_and_round_trip(imp in site_id().prop_flat_map(impression)) {
        prop_assert!(imp.validate(now()).is_ok());
        let json = serde_json::to_value(&imp).unwrap();
        let back: Impression = serde_json::from_value(json.clone()).unwrap();
        prop_assert_eq!(&back, &imp);
        // The lenient parser agrees with the typed one.
        let ctx = ParseContext { site_id: Some(&imp.site_id), now: now(), keep_seq: true };
        let parsed = parse_impression(&json, &ctx).unwrap();
        prop_assert_eq!(&parsed, &imp);
        // Without an id, the same id is derived again.
        let mut no_id = json;
        no_id.as_object_mut().unwrap().remove("impression_id");
        prop_assert_eq!(parse_impression(&no_id, &ctx).unwrap().impression_id, imp.impression_id);
    }

    #[test]
    fn envelopes_round_trip(
        (site, imps) in site_id().prop_flat_map(|s| (Just(s.clone()), prop::collection::vec(impression(s), 1..40)))
    ) {
        let env = BatchEnvelope::new(&site, Uuid::now_v7(), imps, now());
        let d = decode_envelope(&site, &env.encode(), now()).unwrap();
        prop_assert!(d.rejected.is_empty());
        prop_assert_eq!(d.valid, env.impressions);
    }

    /// The envelope fast path parses with sonic-rs, the careful path and
    /// the edge with serde_json: on anything serde_json writes (escaped and
    /// non-ASCII text, any finite f64) both read back the same values.
    #[test]
    fn the_fast_path_reads_what_serde_json_reads(
        imps in site_id().prop_flat_map(|s| prop::collection::vec(impression(s), 1..8)),
        names in prop::collection::vec("[a-zA-Z0-9 \"\\\\/éü€😀\u{7f}\t\n-]{1,40}", 8),
        bits in prop::collection::vec(any::<u64>(), 16),
    ) {
        let mut imps = imps;
        for (k, imp) in imps.iter_mut().enumerate() {
            imp.video_filename = names[k].clone();
            imp.video_id = Some(names[(k + 1) % 8].clone());
            let f = |b: u64| { let x = f64::from_bits(b & 0x7fef_ffff_ffff_ffff); if x.is_finite() { x } else { 0.0 } };
            imp.duration_played = f(bits[2 * k]);
            imp.video_duration = f(bits[2 * k + 1]);
        }
        let env = BatchEnvelope::new(&imps[0].site_id.clone(), Uuid::now_v7(), imps, now());
        let bytes = env.encode();
        let careful: BatchEnvelope = serde_json::from_slice(&bytes).unwrap();
        let fast: BatchEnvelope = sonic_rs::from_slice(&bytes).unwrap();
        prop_assert_eq!(&fast, &careful);
        prop_assert_eq!(&fast, &env);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_envelope("s1", &bytes, now());
        let _ = Receipt::decode(&bytes);
        let _ = schema::parse_body(&bytes, schema::BodyShape::ObjectOrArray, Some("s1"), now(), false);
    }

    #[test]
    fn mutated_fields_are_caught_and_named(
        imp in site_id().prop_flat_map(impression),
        which in 0usize..6,
    ) {
        let mut json = serde_json::to_value(&imp).unwrap();
        let (field, bad) = match which {
            0 => ("event_type", serde_json::json!("party")),
            1 => ("period", serde_json::json!(1)),
            2 => ("duration_played", serde_json::json!(-1.0)),
            3 => ("played_at", serde_json::json!("2099-01-01T00:00:00Z")),
            4 => ("audience_estimate", serde_json::json!(-3)),
            _ => ("video_duration", serde_json::json!(1e9)),
        };
        json[field] = bad;
        let ctx = ParseContext { site_id: Some(&imp.site_id), now: now(), keep_seq: true };
        let errs = parse_impression(&json, &ctx).unwrap_err();
        prop_assert!(errs.iter().any(|e| e.field == field), "{:?}", errs);
    }

    #[test]
    fn compressed_ranges_cover_exactly_the_input(seqs in prop::collection::vec(1i64..500, 0..200)) {
        let ranges = SeqRange::compress(seqs.iter().copied());
        for s in &seqs {
            prop_assert!(ranges.iter().any(|r| r.contains(*s)));
        }
        let covered: u64 = ranges.iter().map(SeqRange::len).sum();
        let mut uniq = seqs.clone();
        uniq.sort_unstable();
        uniq.dedup();
        prop_assert_eq!(covered, uniq.len() as u64);
        for w in ranges.windows(2) {
            prop_assert!(w[0].last + 1 < w[1].first, "disjoint and not adjacent");
        }
    }
}
