//! Offer checks and negotiation settings: what a call accepts (Opus audio, VP8 or H.264
//! Constrained Baseline video), the codec order of the answer (VP8 first: every browser has it
//! and it needs no profile matching), and the media engine both ends use.

use std::io::Cursor;

use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8,
};
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind,
};
use rtc::sdp::description::session::SessionDescription;
use webrtc::peer_connection::MediaEngine;

use crate::media::video_decode::VideoCodec;

/// Largest SDP body accepted.
pub const MAX_SDP_BYTES: usize = 64 * 1024;

/// Why an offer cannot be answered; the message is what the HTTP client reads.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OfferError {
    #[error("malformed SDP offer: {0}")]
    Malformed(String),
    #[error("the offer has no audio section: a call needs the microphone (Opus audio)")]
    NoAudio,
    #[error("no supported audio codec: the call needs opus/48000/2, the offer has {0}")]
    UnsupportedAudio(String),
    #[error(
        "no supported video codec: the call decodes VP8 or H.264 (Constrained Baseline), the offer has {0}"
    )]
    UnsupportedVideo(String),
}

/// What a checked offer carries.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferSummary {
    /// The client sends its microphone (the audio section is not receive-only).
    pub sends_audio: bool,
    /// Supported video codecs offered, in the offer's order; empty without video.
    pub video_codecs: Vec<VideoCodec>,
    pub has_data_channel: bool,
}

fn codec_list(codecs: &[(String, u32)]) -> String {
    if codecs.is_empty() {
        return "none".into();
    }
    codecs
        .iter()
        .map(|(name, rate)| format!("{name}/{rate}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether an H.264 format is one our decoder takes: Constrained Baseline or Baseline
/// (profile_idc 66), packetization mode 0 or 1. A missing profile-level-id means Baseline.
fn h264_supported(fmtp: &str) -> bool {
    let mut profile_ok = true;
    let mut mode_ok = true;
    for param in fmtp.split(';') {
        let Some((key, value)) = param.trim().split_once('=') else {
            continue;
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "profile-level-id" => {
                profile_ok = value.trim().len() == 6 && value.trim()[..2].eq_ignore_ascii_case("42")
            }
            "packetization-mode" => mode_ok = matches!(value.trim(), "0" | "1"),
            _ => {}
        }
    }
    profile_ok && mode_ok
}

/// Parses and checks an offer.
pub fn check_offer(sdp: &str) -> Result<OfferSummary, OfferError> {
    if sdp.len() > MAX_SDP_BYTES {
        return Err(OfferError::Malformed(format!(
            "{} bytes (at most {MAX_SDP_BYTES})",
            sdp.len()
        )));
    }
    if !sdp.trim_start().starts_with("v=0") {
        return Err(OfferError::Malformed("it does not start with v=0".into()));
    }
    let desc = SessionDescription::unmarshal(&mut Cursor::new(sdp.as_bytes()))
        .map_err(|e| OfferError::Malformed(e.to_string()))?;
    let mut audio_seen = false;
    let mut audio_ok = false;
    let mut sends_audio = false;
    let mut audio_codecs = vec![];
    let mut video_codecs = vec![];
    let mut video_offered = vec![];
    let mut video_seen = false;
    let mut has_data_channel = false;
    for media in &desc.media_descriptions {
        let rejected = media.media_name.port.value == 0;
        let codecs = media.codecs();
        // the m= line's order is the offerer's preference
        let ordered: Vec<_> = media
            .media_name
            .formats
            .iter()
            .filter_map(|f| f.parse::<u8>().ok())
            .filter_map(|pt| codecs.get(&pt))
            .collect();
        match media.media_name.media.as_str() {
            "audio" if !rejected => {
                audio_seen = true;
                for c in &ordered {
                    audio_codecs.push((c.name.clone(), c.clock_rate));
                    if c.name.eq_ignore_ascii_case("opus") && c.clock_rate == 48_000 {
                        audio_ok = true;
                    }
                }
                sends_audio |=
                    !(media.has_attribute("recvonly") || media.has_attribute("inactive"));
            }
            "video" if !rejected => {
                video_seen = true;
                for c in &ordered {
                    if c.name.eq_ignore_ascii_case("rtx") {
                        continue;
                    }
                    video_offered.push((c.name.clone(), c.clock_rate));
                    let codec = if c.name.eq_ignore_ascii_case("VP8") {
                        Some(VideoCodec::Vp8)
                    } else if c.name.eq_ignore_ascii_case("H264") && h264_supported(&c.fmtp) {
                        Some(VideoCodec::H264)
                    } else {
                        None
                    };
                    if let Some(codec) = codec
                        && !video_codecs.contains(&codec)
                    {
                        video_codecs.push(codec);
                    }
                }
            }
            "application" if !rejected => has_data_channel = true,
            _ => {}
        }
    }
    if !audio_seen {
        return Err(OfferError::NoAudio);
    }
    if !audio_ok {
        return Err(OfferError::UnsupportedAudio(codec_list(&audio_codecs)));
    }
    if video_seen && video_codecs.is_empty() {
        return Err(OfferError::UnsupportedVideo(codec_list(&video_offered)));
    }
    Ok(OfferSummary {
        sends_audio,
        video_codecs,
        has_data_channel,
    })
}

/// Reorders the formats of every `m=video` line so that VP8 comes first, then H.264, then the
/// rest (each with its retransmission format right after it). The answer keeps the offer's
/// order, and a browser sends the first codec of the answer.
pub fn prefer_vp8(sdp: &str) -> String {
    let Ok(desc) = SessionDescription::unmarshal(&mut Cursor::new(sdp.as_bytes())) else {
        return sdp.to_string();
    };
    let mut orders = vec![];
    for media in desc
        .media_descriptions
        .iter()
        .filter(|m| m.media_name.media == "video")
    {
        let codecs = media.codecs();
        let rank = |pt: &str| -> u8 {
            let Some(c) = pt.parse::<u8>().ok().and_then(|pt| codecs.get(&pt)) else {
                return 3;
            };
            let primary = if c.name.eq_ignore_ascii_case("rtx") {
                // a retransmission format ranks with the format it repairs
                c.fmtp
                    .split(';')
                    .find_map(|p| p.trim().strip_prefix("apt="))
                    .and_then(|apt| apt.parse::<u8>().ok())
                    .and_then(|apt| codecs.get(&apt))
            } else {
                Some(c)
            };
            match primary {
                Some(p) if p.name.eq_ignore_ascii_case("VP8") => 0,
                Some(p) if p.name.eq_ignore_ascii_case("H264") && h264_supported(&p.fmtp) => 1,
                _ => 2,
            }
        };
        let mut formats = media.media_name.formats.clone();
        formats.sort_by_key(|f| rank(f)); // stable: keeps the offer's order within a rank
        orders.push(formats);
    }
    let mut orders = orders.into_iter();
    let ending = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.lines() {
        if line.starts_with("m=video ")
            && let Some(formats) = orders.next()
        {
            let head: Vec<&str> = line.split_whitespace().take(3).collect();
            out.push_str(&head.join(" "));
            for f in formats {
                out.push(' ');
                out.push_str(&f);
            }
        } else {
            out.push_str(line);
        }
        out.push_str(ending);
    }
    out
}

fn video_feedback() -> Vec<RTCPFeedback> {
    [
        ("goog-remb", ""),
        ("ccm", "fir"),
        ("nack", ""),
        ("nack", "pli"),
    ]
    .into_iter()
    .map(|(typ, parameter)| RTCPFeedback {
        typ: typ.into(),
        parameter: parameter.into(),
    })
    .collect()
}

/// The codecs a call negotiates: Opus for audio; VP8, then H.264 Constrained Baseline in both
/// packetization modes, for video. No retransmission format is registered, so a browser
/// retransmits NACKed packets on the media stream itself.
pub fn media_engine(video: &[VideoCodec]) -> anyhow::Result<MediaEngine> {
    let mut engine = MediaEngine::default();
    engine.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_OPUS.into(),
                clock_rate: 48_000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
                rtcp_feedback: vec![],
            },
            payload_type: 111,
        },
        RtpCodecKind::Audio,
    )?;
    for codec in video {
        let formats: &[(&str, &str, u8)] = match codec {
            VideoCodec::Vp8 => &[(MIME_TYPE_VP8, "", 96)],
            VideoCodec::H264 => &[
                (
                    MIME_TYPE_H264,
                    "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
                    125,
                ),
                (
                    MIME_TYPE_H264,
                    "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
                    102,
                ),
                (
                    MIME_TYPE_H264,
                    "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f",
                    108,
                ),
                (
                    MIME_TYPE_H264,
                    "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f",
                    127,
                ),
            ],
        };
        for &(mime, fmtp, payload_type) in formats {
            engine.register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: RTCRtpCodec {
                        mime_type: mime.into(),
                        clock_rate: 90_000,
                        channels: 0,
                        sdp_fmtp_line: fmtp.into(),
                        rtcp_feedback: video_feedback(),
                    },
                    payload_type,
                },
                RtpCodecKind::Video,
            )?;
        }
    }
    Ok(engine)
}

/// The codec a negotiated MIME type names.
pub fn video_codec_of_mime(mime: &str) -> Option<VideoCodec> {
    if mime.eq_ignore_ascii_case(MIME_TYPE_VP8) {
        Some(VideoCodec::Vp8)
    } else if mime.eq_ignore_ascii_case(MIME_TYPE_H264) {
        Some(VideoCodec::H264)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An offer as Chromium writes it (trimmed: one candidate, fewer extensions).
    pub(crate) const CHROME_OFFER: &str = "v=0\r
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r
s=-\r
t=0 0\r
a=group:BUNDLE 0 1 2\r
a=msid-semantic: WMS\r
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8\r
c=IN IP4 0.0.0.0\r
a=rtcp:9 IN IP4 0.0.0.0\r
a=candidate:1 1 udp 2113937151 127.0.0.1 50000 typ host\r
a=ice-ufrag:abcd\r
a=ice-pwd:abcdefghijklmnopqrstuvwx\r
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r
a=setup:actpass\r
a=mid:0\r
a=sendrecv\r
a=rtcp-mux\r
a=rtpmap:111 opus/48000/2\r
a=fmtp:111 minptime=10;useinbandfec=1\r
a=rtpmap:63 red/48000/2\r
a=rtpmap:9 G722/8000\r
a=rtpmap:0 PCMU/8000\r
a=rtpmap:8 PCMA/8000\r
m=video 9 UDP/TLS/RTP/SAVPF 98 99 96 97 102 103 45 46\r
c=IN IP4 0.0.0.0\r
a=ice-ufrag:abcd\r
a=ice-pwd:abcdefghijklmnopqrstuvwx\r
a=setup:actpass\r
a=mid:1\r
a=sendrecv\r
a=rtcp-mux\r
a=rtpmap:98 VP9/90000\r
a=fmtp:98 profile-id=0\r
a=rtpmap:99 rtx/90000\r
a=fmtp:99 apt=98\r
a=rtpmap:96 VP8/90000\r
a=rtcp-fb:96 nack pli\r
a=rtpmap:97 rtx/90000\r
a=fmtp:97 apt=96\r
a=rtpmap:102 H264/90000\r
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f\r
a=rtpmap:103 rtx/90000\r
a=fmtp:103 apt=102\r
a=rtpmap:45 AV1/90000\r
a=rtpmap:46 rtx/90000\r
a=fmtp:46 apt=45\r
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r
c=IN IP4 0.0.0.0\r
a=ice-ufrag:abcd\r
a=ice-pwd:abcdefghijklmnopqrstuvwx\r
a=setup:actpass\r
a=mid:2\r
a=sctp-port:5000\r
";

    #[test]
    fn a_browser_offer_is_accepted() {
        let summary = check_offer(CHROME_OFFER).unwrap();
        assert_eq!(
            summary,
            OfferSummary {
                sends_audio: true,
                video_codecs: vec![VideoCodec::Vp8, VideoCodec::H264],
                has_data_channel: true,
            }
        );
    }

    #[test]
    fn vp8_is_moved_first_with_its_retransmission_format() {
        let sdp = prefer_vp8(CHROME_OFFER);
        assert!(
            sdp.contains("m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 98 99 45 46\r\n"),
            "{sdp}"
        );
        // nothing else changes
        assert_eq!(sdp.len(), CHROME_OFFER.len());
        assert!(sdp.contains("m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8\r\n"));
        assert_eq!(prefer_vp8("garbage"), "garbage");
    }

    #[test]
    fn unacceptable_offers_are_named() {
        assert!(matches!(check_offer(""), Err(OfferError::Malformed(_))));
        assert!(matches!(
            check_offer("hello, I am not SDP"),
            Err(OfferError::Malformed(_))
        ));
        assert!(matches!(
            check_offer("v=0\r\no=broken\r\n"),
            Err(OfferError::Malformed(_))
        ));
        let no_audio = CHROME_OFFER.replace("m=audio 9", "m=audio 0");
        assert_eq!(check_offer(&no_audio), Err(OfferError::NoAudio));
        let pcmu_only = CHROME_OFFER.replace("a=rtpmap:111 opus/48000/2", "a=rtpmap:111 iLBC/8000");
        let err = check_offer(&pcmu_only).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no supported audio codec: the call needs opus/48000/2, the offer has iLBC/8000, red/48000, G722/8000, PCMU/8000, PCMA/8000"
        );
        let av1_only = CHROME_OFFER
            .replace("VP8/90000", "VP9/90000")
            .replace("H264/90000", "H265/90000");
        let err = check_offer(&av1_only).unwrap_err();
        assert!(matches!(err, OfferError::UnsupportedVideo(_)), "{err}");
        assert!(
            err.to_string()
                .contains("VP9/90000, VP9/90000, H265/90000, AV1/90000"),
            "{err}"
        );
        let high_profile = CHROME_OFFER
            .replace("VP8/90000", "VP9/90000")
            .replace("profile-level-id=42001f", "profile-level-id=640c1f");
        assert!(matches!(
            check_offer(&high_profile),
            Err(OfferError::UnsupportedVideo(_))
        ));
        let huge = format!("{CHROME_OFFER}{}", "a=x\r\n".repeat(MAX_SDP_BYTES / 4));
        assert!(matches!(check_offer(&huge), Err(OfferError::Malformed(_))));
    }

    #[test]
    fn receive_only_audio_is_accepted() {
        let recv_only = CHROME_OFFER.replacen("a=sendrecv", "a=recvonly", 1);
        assert!(!check_offer(&recv_only).unwrap().sends_audio);
    }

    #[test]
    fn h264_profiles() {
        assert!(h264_supported(
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
        ));
        assert!(h264_supported("packetization-mode=0"));
        assert!(!h264_supported("profile-level-id=640c1f"));
        assert!(!h264_supported(
            "packetization-mode=2;profile-level-id=42e01f"
        ));
    }

    #[test]
    fn engine_has_the_call_codecs() {
        assert!(media_engine(&[VideoCodec::Vp8, VideoCodec::H264]).is_ok());
        assert_eq!(video_codec_of_mime("video/vp8"), Some(VideoCodec::Vp8));
        assert_eq!(video_codec_of_mime("video/H264"), Some(VideoCodec::H264));
        assert_eq!(video_codec_of_mime("video/AV1"), None);
    }
}
