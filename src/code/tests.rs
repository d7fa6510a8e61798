//! Unit tests of the code formats: serde shape, spec rules, normalisation, validation and its
//! hints, check characters, generation, digests, hostile input and properties.

use super::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const HOSTILE: &[&str] = &[
    "'; DROP TABLE keys; --",
    "\0",
    "ABCD\0EFGH",
    "ABC\u{202E}DEF",
    "\u{202E}ABCDEFGH",
    "AB🎁CD",
    "🎁🎁🎁🎁",
    "\u{FEFF}ABCD",
    "ＡＢＣＤ",
    "<script>alert(1)</script>",
    "%00%0a",
    "ABCD\r\nEFGH",
    "ß",
];

fn crockford_checked() -> Format {
    Format::crockford32(16, 4, true)
}

fn decimal_luhn() -> Format {
    Format {
        charset: Some("0123456789".to_owned()),
        check: Check::Luhn,
        ..Format::default()
    }
}

fn case_sensitive_odd() -> Format {
    // 0-9, a-z, A-Z minus 'O', plus '_' and '.' = 63 symbols: odd N for Luhn.
    let mut charset: String = ('0'..='9').chain('a'..='z').collect();
    charset.extend(('A'..='Z').filter(|&c| c != 'O'));
    charset.push_str("_.");
    Format {
        charset: Some(charset),
        min_length: 8,
        max_length: 20,
        group_size: 5,
        case_sensitive: true,
        check: Check::Luhn,
        ..Format::default()
    }
}

fn formats() -> Vec<Format> {
    vec![
        Format::default(),
        crockford_checked(),
        Format::crockford32(10, 0, false),
        Format::crockford32(2, 1, true),
        decimal_luhn(),
        Format {
            check: Check::Luhn,
            group_size: 4,
            ..Format::default()
        },
        case_sensitive_odd(),
        Format {
            charset: Some("AB".to_owned()),
            min_length: 100,
            max_length: 200,
            check: Check::Luhn,
            ..Format::default()
        },
    ]
}

fn checked_formats() -> Vec<Format> {
    formats()
        .into_iter()
        .filter(|f| f.check == Check::Luhn)
        .collect()
}

#[test]
fn all_test_formats_are_valid_specs() {
    for format in formats() {
        assert_eq!(format.validate_spec(), Ok(()), "{format:?}");
    }
}

// ---- serde ----

#[test]
fn empty_json_is_the_default_preset() {
    let format: Format = serde_json::from_str("{}").unwrap();
    assert_eq!(format, Format::default());
    assert_eq!(format.effective_charset(), DEFAULT_CHARSET);
    assert_eq!(format.min_length, 1);
    assert_eq!(format.max_length, 256);
    assert_eq!(format.group_size, 0);
    assert!(!format.case_sensitive);
    assert_eq!(format.check, Check::None);
    assert_eq!(format.version, 1);
}

#[test]
fn crockford_preset_alone_brings_its_charset() {
    let format: Format = serde_json::from_str(r#"{"preset":"crockford32"}"#).unwrap();
    assert_eq!(format.effective_charset(), CROCKFORD32_CHARSET);
    assert_eq!(format.validate_spec(), Ok(()));
    assert_eq!(format.validate("o1l-i"), Ok("0111".to_owned()));
}

#[test]
fn full_json_round_trips() {
    let json = r#"{"preset":"default","charset":"0123456789","min_length":12,
        "max_length":12,"group_size":4,"case_sensitive":false,"check":"luhn","version":1}"#;
    let format: Format = serde_json::from_str(json).unwrap();
    assert_eq!(format.charset.as_deref(), Some("0123456789"));
    assert_eq!(format.check, Check::Luhn);
    let again: Format = serde_json::from_str(&serde_json::to_string(&format).unwrap()).unwrap();
    assert_eq!(again, format);
}

#[test]
fn default_serialises_without_charset() {
    let json = serde_json::to_value(Format::default()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"preset":"default","min_length":1,"max_length":256,
            "group_size":0,"case_sensitive":false,"check":"none","version":1})
    );
    let crockford = serde_json::to_value(crockford_checked()).unwrap();
    assert_eq!(crockford["preset"], "crockford32");
    assert_eq!(crockford["check"], "luhn");
}

#[test]
fn unknown_fields_and_values_are_rejected() {
    assert!(serde_json::from_str::<Format>(r#"{"charsets":"AB"}"#).is_err());
    assert!(serde_json::from_str::<Format>(r#"{"preset":"base64"}"#).is_err());
    assert!(serde_json::from_str::<Format>(r#"{"check":"crc"}"#).is_err());
    assert!(serde_json::from_str::<Format>(r#"{"min_length":-1}"#).is_err());
}

#[test]
fn null_charset_means_preset_charset() {
    let format: Format = serde_json::from_str(r#"{"charset":null}"#).unwrap();
    assert_eq!(format, Format::default());
}

// ---- validate_spec ----

fn spec_error(format: Format) -> String {
    match format.validate_spec() {
        Err(e) => e.to_string(),
        Ok(()) => panic!("spec unexpectedly valid: {format:?}"),
    }
}

fn with_charset(charset: &str) -> Format {
    Format {
        charset: Some(charset.to_owned()),
        ..Format::default()
    }
}

#[test]
fn spec_rejects_bad_charsets() {
    assert!(spec_error(with_charset("")).contains("empty"));
    assert!(spec_error(with_charset("A")).contains("at least 2"));
    assert!(spec_error(with_charset("ABA")).contains("duplicate"));
    assert!(spec_error(with_charset("AB C")).contains("character 3"));
    assert!(spec_error(with_charset("AB-")).contains("character 3"));
    assert!(spec_error(with_charset("AB\0")).contains("printable ASCII"));
    assert!(spec_error(with_charset("ABÉ")).contains("printable ASCII"));
    assert!(spec_error(with_charset("AB🎁")).contains("printable ASCII"));
    assert!(spec_error(with_charset("AB\t")).contains("printable ASCII"));
    assert!(spec_error(with_charset("abc")).contains("case_sensitive"));
    let lower = Format {
        case_sensitive: true,
        ..with_charset("abc")
    };
    assert_eq!(lower.validate_spec(), Ok(()));
    let everything: String = (0x21u8..=0x7e)
        .filter(|&b| b != b'-')
        .map(char::from)
        .collect();
    let everything = Format {
        case_sensitive: true,
        ..with_charset(&everything)
    };
    assert_eq!(everything.validate_spec(), Ok(()));
}

#[test]
fn spec_rejects_bad_lengths() {
    let f = |min_length, max_length| Format {
        min_length,
        max_length,
        ..Format::default()
    };
    assert!(spec_error(f(0, 10)).contains("min_length"));
    assert!(spec_error(f(1, 257)).contains("at most 256"));
    assert!(spec_error(f(11, 10)).contains("must not exceed"));
    assert!(spec_error(f(1, 0)).contains("must not exceed"));
    assert_eq!(f(256, 256).validate_spec(), Ok(()));
    assert_eq!(f(1, 1).validate_spec(), Ok(()));
}

#[test]
fn spec_rules_for_check_grouping_version_and_preset() {
    assert!(spec_error(Format::crockford32(1, 0, true)).contains("luhn"));
    assert_eq!(Format::crockford32(1, 0, false).validate_spec(), Ok(()));
    assert!(spec_error(Format::crockford32(0, 0, false)).contains("min_length"));
    assert!(spec_error(Format::crockford32(300, 0, false)).contains("256"));
    assert!(spec_error(Format::crockford32(8, 9, false)).contains("group_size"));
    assert!(spec_error(Format {
        version: 2,
        ..Format::default()
    })
    .contains("version 2"));
    assert!(spec_error(Format {
        charset: Some("ABC".to_owned()),
        ..Format::crockford32(8, 0, false)
    })
    .contains("crockford32"));
    assert_eq!(
        Format {
            charset: Some(CROCKFORD32_CHARSET.to_owned()),
            ..Format::crockford32(8, 0, false)
        }
        .validate_spec(),
        Ok(())
    );
    assert!(spec_error(Format {
        case_sensitive: true,
        ..Format::crockford32(8, 0, false)
    })
    .contains("case_sensitive"));
}

// ---- normalise ----

#[test]
fn normalise_trims_drops_separators_and_upper_cases() {
    let f = Format::default();
    assert_eq!(f.normalise("  abcd-efgh ijkl\t\n"), "ABCDEFGHIJKL");
    assert_eq!(f.normalise("\u{3000}ab_cd\u{00A0}"), "AB_CD");
    assert_eq!(f.normalise("- \tX"), "X");
    assert_eq!(f.normalise("a\tb"), "A\tB");
    assert_eq!(f.normalise("ß"), "ß", "non-ASCII is left alone");
    assert_eq!(f.normalise("---"), "");
}

#[test]
fn default_charset_maps_no_lookalikes() {
    assert_eq!(Format::default().normalise("oil-OIL"), "OILOIL");
}

#[test]
fn crockford_maps_lookalikes() {
    let f = crockford_checked();
    assert_eq!(f.normalise("o0 iI lL uU"), "001111UU");
}

#[test]
fn lookalikes_only_where_the_charset_allows() {
    // '0' is not in the charset: 'O' stays.
    assert_eq!(with_charset("ABO").normalise("o"), "O");
    // Both 'O' and '0' are in the charset: no mapping.
    assert_eq!(with_charset("O0").normalise("o"), "O");
    // '1' in the charset, 'I' and 'L' not.
    assert_eq!(with_charset("0123456789").normalise("I l O"), "110");
    // Case-sensitive: no upper-casing, so lower-case look-alikes stay.
    let cs = Format {
        case_sensitive: true,
        ..with_charset("01ab")
    };
    assert_eq!(cs.normalise("Ab o O"), "Abo0");
}

// ---- validate ----

#[test]
fn default_accepts_supplier_codes() {
    let f = Format::default();
    assert_eq!(f.validate("abcd-1234_xyz"), Ok("ABCD1234_XYZ".to_owned()));
    assert_eq!(f.validate(" X "), Ok("X".to_owned()));
    assert_eq!(f.validate(&"a".repeat(256)), Ok("A".repeat(256)));
}

#[test]
fn empty_codes() {
    let f = Format::default();
    for raw in ["", "   ", "- - -", "\t\n", "\u{2003}"] {
        assert_eq!(f.validate(raw), Err(Malformed::Empty), "{raw:?}");
    }
    assert_eq!(Malformed::Empty.to_string(), "code is empty");
}

#[test]
fn too_long_hint() {
    let err = Format::default().validate(&"A".repeat(300)).unwrap_err();
    assert_eq!(err, Malformed::TooLong { max: 256, got: 300 });
    assert_eq!(
        err.to_string(),
        "code has 300 characters: at most 256 allowed"
    );
}

#[test]
fn too_long_is_reported_before_bad_characters() {
    let err = crockford_checked().validate(&"U".repeat(17)).unwrap_err();
    assert_eq!(err, Malformed::TooLong { max: 16, got: 17 });
}

#[test]
fn too_short_hint() {
    let f = crockford_checked();
    let err = f.validate("ABC").unwrap_err();
    assert_eq!(err, Malformed::TooShort { min: 16, got: 3 });
    assert_eq!(
        err.to_string(),
        "code has 3 characters: at least 16 required"
    );
    let err = f.validate("A").unwrap_err();
    assert_eq!(
        err.to_string(),
        "code has 1 character: at least 16 required"
    );
}

#[test]
fn check_raises_the_minimum_to_two() {
    let f = Format {
        check: Check::Luhn,
        ..Format::default()
    };
    assert_eq!(f.validate("0"), Err(Malformed::TooShort { min: 2, got: 1 }));
    assert_eq!(f.validate("00"), Ok("00".to_owned()));
}

#[test]
fn bad_character_is_reported_before_too_short() {
    let err = crockford_checked().validate("ABCDU").unwrap_err();
    assert!(matches!(err, Malformed::BadCharacter { position: 5, .. }));
}

#[test]
fn bad_character_hint_for_crockford() {
    let err = crockford_checked().validate("ABCD-U123").unwrap_err();
    assert_eq!(
        err,
        Malformed::BadCharacter {
            position: 5,
            expected: "0-9, A-Z except I L O U".to_owned()
        }
    );
    assert_eq!(
        err.to_string(),
        "character 5, not counting spaces and dashes, is not allowed: expected one of 0-9, A-Z except I L O U"
    );
}

#[test]
fn bad_character_positions_count_characters_in_the_normalised_code() {
    let f = Format::default();
    assert!(matches!(
        f.validate("  ab-cd é"),
        Err(Malformed::BadCharacter { position: 5, .. })
    ));
    assert!(matches!(
        f.validate("🎁🎁A!"),
        Err(Malformed::BadCharacter { position: 1, .. })
    ));
    assert!(matches!(
        f.validate("AB🎁CD"),
        Err(Malformed::BadCharacter { position: 3, .. })
    ));
}

#[test]
fn charset_descriptions() {
    let describe = |f: &Format| describe_charset(&Symbols::new(f.effective_charset()));
    assert_eq!(describe(&Format::default()), "0-9, A-Z, _");
    assert_eq!(describe(&crockford_checked()), "0-9, A-Z except I L O U");
    assert_eq!(describe(&with_charset("0123456789")), "0-9");
    assert_eq!(describe(&with_charset("0123456789ABCDEF")), "0-9, A-F");
    assert_eq!(describe(&with_charset("23456789")), "2-9");
    assert_eq!(describe(&with_charset("AB")), "A, B");
    assert_eq!(
        describe(&with_charset("ACEGXYZ,.")),
        "A, C, E, G, X-Z, comma, ."
    );
    assert_eq!(
        describe(&case_sensitive_odd()),
        "0-9, A-Z except O, a-z, ., _"
    );
    let everything: String = (0x21u8..=0x7e)
        .filter(|&b| b != b'-')
        .map(char::from)
        .collect();
    assert_eq!(
        describe(&with_charset(&everything)),
        "printable ASCII except space and -"
    );
    let many: String = (0x21u8..=0x7e)
        .filter(|&b| b != b'-' && !b.is_ascii_lowercase())
        .map(char::from)
        .collect();
    assert_eq!(
        describe(&with_charset(&many)),
        "0-9, A-Z, 31 punctuation symbols"
    );
    assert_eq!(
        describe(&with_charset("")),
        "nothing (the format has no usable charset)"
    );
}

#[test]
fn case_sensitive_format_keeps_case() {
    let f = case_sensitive_odd();
    let code = f.generate(&mut StdRng::seed_from_u64(7));
    let canonical = f.validate(&code).unwrap();
    assert_eq!(canonical, code.replace('-', ""));
    let upper = Format {
        charset: Some("ABC".to_owned()),
        case_sensitive: true,
        ..Format::default()
    };
    assert!(matches!(
        upper.validate("AbC"),
        Err(Malformed::BadCharacter { position: 2, .. })
    ));
}

// ---- check character ----

#[test]
fn decimal_luhn_is_the_credit_card_check() {
    let f = decimal_luhn();
    assert_eq!(f.validate("7992 7398 713"), Ok("79927398713".to_owned()));
    assert_eq!(
        f.validate("4539 1488 0343 6467"),
        Ok("4539148803436467".to_owned())
    );
    assert_eq!(
        f.validate("79927398710"),
        Err(Malformed::CheckMismatch { position: 11 })
    );
}

#[test]
fn crockford_check_mismatch_hint() {
    let f = crockford_checked();
    let code = f.generate(&mut StdRng::seed_from_u64(1));
    let mut canonical: Vec<u8> = f.validate(&code).unwrap().into_bytes();
    let last = canonical.len() - 1;
    canonical[last] = if canonical[last] == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(canonical).unwrap();
    let err = f.validate(&tampered).unwrap_err();
    assert_eq!(err, Malformed::CheckMismatch { position: 16 });
    assert_eq!(
        err.to_string(),
        "check character at position 16 does not match: the code has a typo"
    );
}

#[test]
fn luhn_doubling_is_a_permutation_for_every_charset_size() {
    for n in 2..=93 {
        let mut seen = vec![false; n];
        for index in 0..n {
            let term = luhn_term(index, true, n);
            assert!(term < n && !seen[term], "n = {n}, index = {index}");
            seen[term] = true;
        }
    }
}

#[test]
fn luhn_catches_adjacent_transpositions() {
    for format in checked_formats() {
        let n = Symbols::new(format.effective_charset()).len;
        let mut missed = 0;
        let mut total = 0;
        for seed in 0..50 {
            let code = format.generate(&mut StdRng::seed_from_u64(seed));
            let canonical = format.validate(&code).unwrap().into_bytes();
            for i in 0..canonical.len() - 1 {
                if canonical[i] == canonical[i + 1] {
                    continue;
                }
                let mut swapped = canonical.clone();
                swapped.swap(i, i + 1);
                let swapped = String::from_utf8(swapped).unwrap();
                total += 1;
                if format.validate(&swapped).is_ok() {
                    missed += 1;
                }
            }
        }
        // Even N misses only swaps of the first and last symbols; odd N misses none.
        // With N = 2 those are the only symbols: a parity bit cannot see swaps.
        if n == 2 {
            continue;
        }
        if n % 2 == 1 {
            assert_eq!(missed, 0, "{format:?}");
        } else {
            assert!(missed * 10 <= total, "{format:?}: {missed}/{total}");
        }
    }
}

#[test]
fn check_character_is_part_of_the_length() {
    let f = crockford_checked();
    let code = f.generate(&mut StdRng::seed_from_u64(3));
    assert_eq!(code.len(), 19, "16 characters in 4 groups: {code}");
    assert_eq!(f.validate(&code).unwrap().len(), 16);
}

// ---- generate ----

#[test]
fn generate_lengths_and_grouping() {
    let mut rng = StdRng::seed_from_u64(42);
    let code = Format::default().generate(&mut rng);
    assert_eq!(code.len(), 16, "max_length 256 > 64 generates 16");
    assert!(!code.contains('-'));

    let code = Format::crockford32(10, 4, false).generate(&mut rng);
    let groups: Vec<usize> = code.split('-').map(str::len).collect();
    assert_eq!(groups, [4, 4, 2]);

    let code = Format {
        min_length: 100,
        max_length: 200,
        ..Format::default()
    }
    .generate(&mut rng);
    assert_eq!(code.len(), 100);

    let code = Format {
        max_length: 64,
        group_size: 8,
        ..Format::default()
    }
    .generate(&mut rng);
    assert_eq!(code.len(), 64 + 7);
}

#[test]
fn display_groups_a_canonical_code() {
    assert_eq!(
        Format::crockford32(10, 4, false).display("ABCDEFGHJK"),
        "ABCD-EFGH-JK"
    );
    assert_eq!(
        Format::crockford32(8, 4, false).display("ABCDEFGH"),
        "ABCD-EFGH"
    );
    assert_eq!(
        Format::crockford32(8, 8, false).display("ABCDEFGH"),
        "ABCDEFGH"
    );
    assert_eq!(Format::default().display("ABCDEFGH"), "ABCDEFGH");
    assert_eq!(Format::crockford32(8, 4, false).display(""), "");
    // Any canonical code, whichever format version it came under: only dashes are added,
    // and every format drops them on input.
    let grouped = Format::crockford32(16, 4, true);
    assert_eq!(grouped.display("OLDCODE0002XYZ"), "OLDC-ODE0-002X-YZ");
    assert_eq!(
        Format::default().validate(&grouped.display("OLDCODE0002XYZ")),
        Ok("OLDCODE0002XYZ".to_owned())
    );
}

#[test]
fn generate_on_an_unusable_format_does_not_panic() {
    let mut rng = StdRng::seed_from_u64(0);
    assert_eq!(with_charset("").generate(&mut rng), "");
    let weird = Format {
        charset: Some("A🎁A".to_owned()),
        min_length: 0,
        max_length: 0,
        group_size: 0,
        check: Check::Luhn,
        ..Format::default()
    };
    assert_eq!(weird.generate(&mut rng), "");
    let one = Format {
        max_length: 3,
        check: Check::Luhn,
        ..with_charset("A")
    };
    assert_eq!(one.generate(&mut rng), "AAA");
}

#[test]
fn validate_on_an_unusable_format_does_not_panic() {
    let formats = [
        with_charset(""),
        Format {
            check: Check::Luhn,
            ..with_charset("A")
        },
        Format {
            min_length: 0,
            max_length: 0,
            check: Check::Luhn,
            ..with_charset("A🎁\0A")
        },
    ];
    for format in formats {
        for raw in ["", "A", "AA", "🎁", "\0"] {
            let _ = format.validate(raw);
            let _ = format.normalise(raw);
        }
    }
}

// ---- digest ----

#[test]
fn digest_is_prefixed_sha256_hex() {
    let expected = {
        let mut hasher = Sha256::new();
        hasher.update(b"kamigate/code/v1\0ABCD");
        hex::encode(hasher.finalize())
    };
    assert_eq!(digest("ABCD"), expected);
    assert_eq!(digest("ABCD").len(), 64);
    assert!(digest("ABCD")
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_ne!(digest("ABCD"), digest("ABCE"));
    assert!(!digest("ABCD").contains("ABCD"));
}

#[test]
fn digest_of_empty_is_the_prefix_hash() {
    let mut hasher = Sha256::new();
    hasher.update(b"kamigate/code/v1\0");
    assert_eq!(digest(""), hex::encode(hasher.finalize()));
}

// ---- hostile input ----

fn assert_hint_hides(raw: &str, err: &Malformed, format: &Format) {
    let hint = err.to_string();
    let debug = format!("{err:?}");
    let normalised = format.normalise(raw);
    for text in [hint, debug] {
        if raw.trim().chars().count() >= 2 {
            assert!(!text.contains(raw), "{text:?} contains {raw:?}");
            assert!(!text.contains(raw.trim()), "{text:?} contains {raw:?}");
        }
        if normalised.chars().count() >= 2 {
            assert!(!text.contains(&normalised), "{text:?} contains {raw:?}");
        }
        // Characters the format refuses are never echoed either.
        for c in normalised.chars().filter(|c| !c.is_ascii_alphanumeric()) {
            if !format.effective_charset().contains(c) {
                assert!(!text.contains(c), "{text:?} echoes {c:?}");
            }
        }
    }
}

#[test]
fn hostile_inputs_are_rejected_with_positions() {
    let f = Format::default();
    let cases: &[(&str, Malformed)] = &[
        (
            "'; DROP TABLE keys; --",
            Malformed::BadCharacter {
                position: 1,
                expected: "0-9, A-Z, _".to_owned(),
            },
        ),
        (
            "\0",
            Malformed::BadCharacter {
                position: 1,
                expected: "0-9, A-Z, _".to_owned(),
            },
        ),
        (
            "ABCD\0EFGH",
            Malformed::BadCharacter {
                position: 5,
                expected: "0-9, A-Z, _".to_owned(),
            },
        ),
        (
            "ABC\u{202E}DEF",
            Malformed::BadCharacter {
                position: 4,
                expected: "0-9, A-Z, _".to_owned(),
            },
        ),
        (
            "AB🎁CD",
            Malformed::BadCharacter {
                position: 3,
                expected: "0-9, A-Z, _".to_owned(),
            },
        ),
    ];
    for (raw, expected) in cases {
        let err = f.validate(raw).unwrap_err();
        assert_eq!(&err, expected, "{raw:?}");
        assert_hint_hides(raw, &err, &f);
    }
}

#[test]
fn huge_inputs_fail_as_too_long() {
    for format in formats() {
        for raw in [
            "A".repeat(10_000),
            "🎁".repeat(10_000),
            "\0".repeat(10_000),
            format!("{}{}", "'; DROP TABLE keys; --".repeat(500), "\u{202E}"),
        ] {
            let err = format.validate(&raw).unwrap_err();
            assert!(
                matches!(err, Malformed::TooLong { got, .. } if got > format.max_length),
                "{err:?}"
            );
            assert_hint_hides(&raw, &err, &format);
        }
    }
    assert_eq!(
        Format::default().validate(&"🎁".repeat(10_000)),
        Err(Malformed::TooLong {
            max: 256,
            got: 10_000
        })
    );
}

#[test]
fn hostile_inputs_never_leak_into_hints() {
    for format in formats() {
        for raw in HOSTILE {
            let err = format.validate(raw).unwrap_err();
            assert_hint_hides(raw, &err, &format);
        }
    }
}

#[test]
fn hints_never_contain_a_secret_code() {
    // A code that is almost right: every error variant, none echoing it.
    let f = crockford_checked();
    let code = f.generate(&mut StdRng::seed_from_u64(9));
    let canonical = f.validate(&code).unwrap();
    let mut tampered = canonical.clone().into_bytes();
    tampered[0] = if tampered[0] == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(tampered).unwrap();
    let inputs = [
        format!("{canonical}U"),
        canonical[..10].to_owned(),
        format!("{}!{}", &canonical[..8], &canonical[9..]),
        tampered,
    ];
    for raw in &inputs {
        let err = f.validate(raw).unwrap_err();
        assert_hint_hides(raw, &err, &f);
        assert!(!err.to_string().contains(&canonical[..8]));
    }
}

// ---- properties ----

fn format_strategy() -> impl Strategy<Value = Format> {
    proptest::sample::select(formats())
}

fn checked_format_strategy() -> impl Strategy<Value = Format> {
    proptest::sample::select(checked_formats())
}

proptest! {
    #[test]
    fn normalise_is_idempotent(format in format_strategy(), raw in any::<String>()) {
        let once = format.normalise(&raw);
        prop_assert_eq!(format.normalise(&once), once);
    }

    #[test]
    fn normalise_is_idempotent_on_separator_soup(
        format in format_strategy(),
        raw in "[ \\-\t\u{a0}\u{2003}oOiIlLuU0aZ_é🎁\u{202e}]{0,24}",
    ) {
        let once = format.normalise(&raw);
        prop_assert_eq!(format.normalise(&once), once);
    }

    #[test]
    fn every_generated_code_validates(format in format_strategy(), seed in any::<u64>()) {
        let code = format.generate(&mut StdRng::seed_from_u64(seed));
        let canonical = format.validate(&code);
        prop_assert!(canonical.is_ok(), "{:?}: {:?}", format, canonical);
        let canonical = canonical.unwrap_or_default();
        prop_assert_eq!(canonical.replace('-', ""), code.replace('-', ""));
        // What gen prints is the display form every answer shows the code in.
        prop_assert_eq!(format.display(&canonical), code.clone());
        // The canonical form is a fixed point of validation.
        prop_assert_eq!(format.validate(&canonical), Ok(canonical.clone()));
        // Lower-cased and re-spaced input is the same code for case-insensitive formats.
        if !format.case_sensitive {
            let sloppy = format!("  {}  ", code.to_ascii_lowercase().replace('-', " - "));
            prop_assert_eq!(format.validate(&sloppy), Ok(canonical));
        }
    }

    #[test]
    fn every_single_substitution_is_caught(
        format in checked_format_strategy(),
        seed in any::<u64>(),
        position in any::<prop::sample::Index>(),
        shift in any::<prop::sample::Index>(),
    ) {
        let code = format.generate(&mut StdRng::seed_from_u64(seed));
        let canonical = format.validate(&code);
        prop_assert!(canonical.is_ok());
        let canonical = canonical.unwrap_or_default().into_bytes();
        let alphabet = Symbols::new(format.effective_charset());
        let alphabet = alphabet.symbols();
        let n = alphabet.len();
        let at = position.index(canonical.len());
        let old = alphabet.iter().position(|&b| b == canonical[at]).unwrap_or(0);
        // Shift by 1..n so the new symbol always differs from the old one.
        let new = (old + 1 + shift.index(n - 1)) % n;
        let mut tampered = canonical.clone();
        tampered[at] = alphabet[new];
        let tampered = String::from_utf8(tampered).unwrap_or_default();
        prop_assert_eq!(
            format.validate(&tampered),
            Err(Malformed::CheckMismatch { position: canonical.len() })
        );
    }

    #[test]
    fn validate_never_panics(format in format_strategy(), raw in any::<String>()) {
        match format.validate(&raw) {
            Ok(canonical) => {
                prop_assert_eq!(&canonical, &format.normalise(&raw));
                prop_assert!(canonical.chars().count() <= format.max_length);
            }
            Err(err) => {
                let _ = err.to_string();
            }
        }
    }

    #[test]
    fn validate_never_panics_on_long_strings(
        format in format_strategy(),
        raw in ".{200,400}",
    ) {
        let _ = format.validate(&raw);
    }

    #[test]
    fn rejected_inputs_never_appear_in_hints(
        format in format_strategy(),
        raw in "[ -~\u{0}\u{202e}🎁é]{12,40}",
    ) {
        if let Err(err) = format.validate(&raw) {
            let hint = err.to_string();
            prop_assert!(!hint.contains(&raw));
            prop_assert!(raw.trim().chars().count() < 12 || !hint.contains(raw.trim()));
            let normalised = format.normalise(&raw);
            prop_assert!(normalised.chars().count() < 12 || !hint.contains(&normalised));
        }
    }
}
