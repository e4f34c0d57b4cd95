// Structure scanner of DICOM Part 10 files in native little-endian transfer syntaxes
// (Implicit / Explicit VR): finds where the elements medge reads lie and checks their
// VRs, without converting any value. Plain C++ (no pybind11). It never decides that a
// file is bad: anything outside the small grammar it accepts is a fallback status, and
// medge.dicom then reads the file with pydicom as before.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace medge {

// Why the scanner handed the file back (0: accepted). The numbers are part of the
// Python contract (medge.dicom); never reuse one.
enum class ScanStatus : int32_t {
  kOk = 0,
  kNoPreamble = 1,        // no 'DICM' at byte 128
  kFileMeta = 2,          // File Meta Information outside the accepted grammar
  kTransferSyntax = 3,    // not Implicit / Explicit VR Little Endian
  kStructure = 4,         // an element layout pydicom reads differently or not at all
  kTruncated = 5,         // an element header or value runs past the end of the data
  kTooDeep = 6,           // sequences nested deeper than kMaxSequenceDepth
  kUnknownVR = 7,         // explicit VR that is not one of the standard's two-letter VRs
  kOrder = 8,             // top-level tags not strictly increasing (duplicates included)
  kEncapsulated = 9,      // undefined-length pixel data (compressed) or any 7FE0 undefined length
  kTooMany = 10,          // more undefined-length elements than kMaxUndefined (implicit VR)
  kRefused = 11,          // a wanted element of kind kRefused is present
  kWrongVR = 12,          // a wanted element's explicit VR is not the one asked for, or its length undefined
};

// Deepest nesting of undefined-length sequences the scanner follows.
constexpr int kMaxSequenceDepth = 32;
// Most undefined-length elements reported back for the caller's dictionary check.
constexpr std::size_t kMaxUndefined = 256;

enum class WantedKind : uint8_t {
  kValue = 0,      // report where its value lies; explicit VR must be `vr`, length defined
  kRefused = 1,    // its presence hands the file back (kRefused)
  kPixelData = 2,  // report where its value lies; explicit VR must be OB or OW, length defined
};

// One element the caller asks about. Group 0002 tags are looked up in the File Meta
// Information, the others at the top level of the data set.
struct WantedElement {
  uint32_t tag = 0;
  char vr[2] = {0, 0};
  WantedKind kind = WantedKind::kValue;
};

// Where one wanted element's value lies in the scanned buffer.
struct FoundElement {
  uint32_t index = 0;   // into the wanted array
  uint64_t offset = 0;  // first byte of the value
  uint64_t length = 0;  // value length in bytes (never undefined)
};

// An undefined-length element met in an Implicit VR data set (at any depth). The scanner
// read it as a sequence; pydicom does so only when its dictionary says SQ, or, for a tag
// it does not know, when the value starts with an Item tag. The caller checks that.
struct UndefinedLength {
  uint32_t tag = 0;
  bool starts_with_item = false;
};

struct ScanResult {
  ScanStatus status = ScanStatus::kOk;
  const char* reason = "";  // static text naming the rule (never bytes of the file)
  uint64_t at = 0;          // byte offset where the scan stopped (for diagnostics)
  bool implicit_vr = false;
  std::vector<FoundElement> found;         // wanted elements found, in file order
  std::vector<UndefinedLength> undefined;  // Implicit VR only
};

// Scans `size` bytes at `data` (a whole Part 10 file). `wanted` must be sorted by tag,
// without duplicates. Reads nothing outside [data, data + size); allocates only the result
// vectors (bounded by wanted_count and kMaxUndefined). On any status but kOk the vectors
// are empty.
ScanResult scan_dicom(const uint8_t* data, std::size_t size, const WantedElement* wanted, std::size_t wanted_count);

}  // namespace medge
