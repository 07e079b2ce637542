/* nbdkit-qcow2: on-disk format constants.
 * Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
 *
 * Facts from the qcow2 specification (QEMU docs/interop/qcow2.txt).
 * Constants only: no code lives here.  All on-disk integers are
 * big-endian and converted at the point where they are read or written.
 */

#ifndef QCOW2_FORMAT_H
#define QCOW2_FORMAT_H

#define QCOW2_MAGIC                 0x514649fbU  /* "QFI\xfb" */

/* Header field offsets (bytes from the start of the file). */
#define HDR_MAGIC                   0
#define HDR_VERSION                 4
#define HDR_BACKING_FILE_OFFSET     8
#define HDR_BACKING_FILE_SIZE       16
#define HDR_CLUSTER_BITS            20
#define HDR_SIZE                    24
#define HDR_CRYPT_METHOD            32
#define HDR_L1_SIZE                 36
#define HDR_L1_TABLE_OFFSET         40
#define HDR_REFCOUNT_TABLE_OFFSET   48
#define HDR_REFCOUNT_TABLE_CLUSTERS 56
#define HDR_NB_SNAPSHOTS            60
#define HDR_SNAPSHOTS_OFFSET        64
#define HDR_INCOMPATIBLE_FEATURES   72   /* v3 only from here on */
#define HDR_COMPATIBLE_FEATURES     80
#define HDR_AUTOCLEAR_FEATURES      88
#define HDR_REFCOUNT_ORDER          96
#define HDR_HEADER_LENGTH           100
#define HDR_COMPRESSION_TYPE        104

#define HDR_V2_LENGTH               72
#define HDR_V3_MIN_LENGTH           104

/* Incompatible feature bits. */
#define INCOMPAT_DIRTY              (UINT64_C(1) << 0)
#define INCOMPAT_CORRUPT            (UINT64_C(1) << 1)
#define INCOMPAT_DATA_FILE          (UINT64_C(1) << 2)
#define INCOMPAT_COMPRESSION        (UINT64_C(1) << 3)
#define INCOMPAT_EXTL2              (UINT64_C(1) << 4)
#define INCOMPAT_KNOWN              (UINT64_C(0x1f))

/* Compatible feature bits. */
#define COMPAT_LAZY_REFCOUNTS       (UINT64_C(1) << 0)

/* Autoclear feature bits. */
#define AUTOCLEAR_BITMAPS           (UINT64_C(1) << 0)
#define AUTOCLEAR_DATA_FILE_RAW     (UINT64_C(1) << 1)
#define AUTOCLEAR_KNOWN             (UINT64_C(0x3))

/* crypt_method. */
#define CRYPT_NONE                  0
#define CRYPT_AES                   1
#define CRYPT_LUKS                  2

/* compression_type. */
#define COMPRESSION_DEFLATE         0
#define COMPRESSION_ZSTD            1

/* Header extension types. */
#define EXT_END                     0x00000000U
#define EXT_BACKING_FORMAT          0xe2792acaU
#define EXT_FEATURE_TABLE           0x6803f857U
#define EXT_BITMAPS                 0x23852875U
#define EXT_CRYPTO                  0x0537be77U
#define EXT_DATA_FILE               0x44415441U

/* L1 / L2 / refcount table entries. */
#define L1E_OFFSET_MASK             UINT64_C(0x00fffffffffffe00)
#define L1E_RESERVED_MASK           UINT64_C(0x7f000000000001ff)
#define L2E_OFFSET_MASK             UINT64_C(0x00fffffffffffe00)
#define L2E_STD_RESERVED_MASK       UINT64_C(0x3f000000000001fe)
#define L2E_COMPRESSED_MASK         UINT64_C(0x3fffffffffffffff)
#define RT_OFFSET_MASK              UINT64_C(0xfffffffffffffe00)
#define RT_RESERVED_MASK            UINT64_C(0x00000000000001ff)

#define QCOW_OFLAG_COPIED           (UINT64_C(1) << 63)
#define QCOW_OFLAG_COMPRESSED       (UINT64_C(1) << 62)
#define QCOW_OFLAG_ZERO             (UINT64_C(1) << 0)

/* Extended L2: second word, bits 0-31 allocated, 32-63 reads-as-zero. */
#define SUBCLUSTERS_PER_CLUSTER     32
#define SC_ALLOC_MASK               UINT64_C(0x00000000ffffffff)
#define SC_ZERO_MASK                UINT64_C(0xffffffff00000000)

/* Snapshot table entry (fixed part). */
#define SN_L1_TABLE_OFFSET          0
#define SN_L1_SIZE                  8
#define SN_ID_STR_SIZE              12
#define SN_NAME_SIZE                14
#define SN_DATE_SEC                 16
#define SN_DATE_NSEC                20
#define SN_VM_CLOCK_NSEC            24
#define SN_VM_STATE_SIZE            32
#define SN_EXTRA_DATA_SIZE          36
#define SN_FIXED_SIZE               40
#define SN_EXTRA_VM_STATE_SIZE_64   0
#define SN_EXTRA_DISK_SIZE          8

/* Bitmap directory entry (qcow2 spec, "Bitmaps"): fixed part, then
 * extra data, then the name, padded to 8 bytes.
 */
#define BME_TABLE_OFFSET            0
#define BME_TABLE_SIZE              8
#define BME_FLAGS                   12
#define BME_TYPE                    16
#define BME_GRANULARITY_BITS        17
#define BME_NAME_SIZE               18
#define BME_EXTRA_DATA_SIZE         20
#define BME_FIXED_SIZE              24
#define BME_FLAG_IN_USE             (UINT32_C(1) << 0)
#define BME_FLAG_AUTO               (UINT32_C(1) << 1)
#define BME_FLAG_EXTRA_COMPATIBLE   (UINT32_C(1) << 2)
#define BME_FLAGS_KNOWN             UINT32_C(0x7)
#define BME_TYPE_DIRTY_TRACKING     1
#define BME_MIN_GRANULARITY_BITS    9
#define BME_MAX_GRANULARITY_BITS    31
#define BME_MAX_NAME_SIZE           1023
/* Bitmap table entry: bits 9-55 the data cluster; with those zero, bit
 * 0 says whether the cluster's bits are all ones.
 */
#define BTE_OFFSET_MASK             UINT64_C(0x00fffffffffffe00)
#define BTE_RESERVED_MASK           UINT64_C(0xff000000000001fe)
#define BTE_ALL_ONES                UINT64_C(1)

/* Limits (QEMU's where it has one; generous enough for any real image). */
#define MIN_CLUSTER_BITS            9
#define MAX_CLUSTER_BITS            21
#define MAX_L1_BYTES                (UINT64_C(32) << 20)
#define MAX_REFTABLE_BYTES          (UINT64_C(8) << 20)
#define MAX_SNAPSHOTS               65536
#define MAX_BACKING_NAME            1023
#define MAX_BACKING_DEPTH           64
#define MAX_BITMAP_TABLE            (UINT32_C(1) << 24)  /* entries */
#define MAX_HOST_OFFSET             (UINT64_C(1) << 56)
#define MAX_VIRTUAL_SIZE            (UINT64_C(1) << 61)  /* 2 EiB */

#endif /* QCOW2_FORMAT_H */
